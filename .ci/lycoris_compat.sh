#!/usr/bin/env bash
# The contract tests against the old end of the supported lycoris-lora range.
#
# setup.cfg declares lycoris-lora>=3.2.0.post2,!=3.2.0,<5; the normal test run (.ci/run) covers
# the newest release that pip resolves (4.x). This script covers the other end: for each version
# in LYCORIS_COMPAT_VERSIONS (default: the oldest supported, 3.2.0.post2, and the newest 3.x,
# 3.4.0) it makes a venv that reuses this interpreter's packages (--system-site-packages: torch,
# transformers, ... are not downloaded again), installs exactly that lycoris-lora into it, and
# runs the contract tests with that venv's python. Run it after `pip install -e ".[test]"`.
# About 3-6 minutes per version on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PYTHON="${PYTHON:-python}"
VERSIONS="${LYCORIS_COMPAT_VERSIONS:-3.2.0.post2 3.4.0}"
TESTS=(tests/test_contract.py tests/test_network.py tests/test_presets.py tests/test_block_settings.py tests/test_versions.py
       tests/test_merge.py tests/test_host_calls.py)
# packaging, not LyCORIS: building a wheel needs the venv's own setuptools/wheel
DESELECT=(--deselect tests/test_presets.py::test_wheel_ships_the_presets)

work="$(mktemp -d "${TMPDIR:-/tmp}/blora-lycoris-compat.XXXXXX")"
trap 'rm -rf "$work"' EXIT

status=0
for version in $VERSIONS; do
    echo "== lycoris-lora $version"
    venv="$work/venv-$version"
    "$PYTHON" -m venv --system-site-packages "$venv"
    # Its requirements (torch, einops, toml, tqdm) are unpinned and already installed outside.
    "$venv/bin/python" -m pip install -q "lycoris-lora==$version"
    "$venv/bin/python" - "$version" <<'EOF'
import sys
from importlib.metadata import version
import lycoris
import blora_network
assert version("lycoris-lora") == sys.argv[1], (version("lycoris-lora"), sys.argv[1])
print(f"lycoris-lora {version('lycoris-lora')} from {lycoris.__file__}; blora_network from {blora_network.__file__}")
EOF
    if ! "$venv/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}" "${DESELECT[@]}"; then
        echo "!! contract tests failed with lycoris-lora $version"
        status=1
    fi
done
exit $status
