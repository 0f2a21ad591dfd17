"""The errors blora_network raises on purpose, and :func:`count`, which their messages share.

Each message is written for the person at the keyboard: it names the file, the key or the
pattern at fault and says what to do. The CLI prints ``str(error)`` as one line and exits
non-zero; sd-scripts shows it as the last line of its traceback.
"""

from __future__ import annotations

__all__ = ["count", "BLoraError", "PresetError", "NetworkArgsError", "LoraFileError", "ModelMismatchError", "DeviceError", "Terminated"]


def count(n: int, noun: str, plural: str = "") -> str:
    """``1 tensor``, ``2 tensors``: the number and the noun that agrees with it, for every message."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"


class BLoraError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""


class PresetError(BLoraError, ValueError):
    """A preset name, file, key, value or regex is wrong, or matches nothing."""


class NetworkArgsError(BLoraError, ValueError):
    """A ``--network_args`` value or a ``create_network`` argument is wrong."""


class LoraFileError(BLoraError, OSError):
    """A weights file is missing, not safetensors, truncated, corrupt or of another model."""


class ModelMismatchError(BLoraError, ValueError):
    """The model handed to us is not sd-scripts' SDXL UNet (diffusers names, SD1.x, ...)."""


class DeviceError(BLoraError, ValueError):
    """A device asked for (``--device cuda``) that this machine or this torch build does not have."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a job scheduler) arrived: treated like Ctrl-C, so every cleanup that
    runs on ``KeyboardInterrupt`` runs on it too."""

    def __init__(self, signum: int = 15):
        super().__init__(signum)
        self.signum = signum
