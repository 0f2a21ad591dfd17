"""A LoRA file: its layers, their math, what the file says about itself, and reading and writing it.

Built on :mod:`blora_network.sdxl` only; the network, the tools and the CLI build on this.

- ``algos.py``: rank, alpha (missing or 0 means rank), one alpha per file, dW, linear scaling and the
  NaN/Inf check, for each adapter algorithm (LoRA, LoHa, LoKr, DoRA).
- ``lorafile.py``: which layers a file holds, of which model, and one loop that reads their tensors.
- ``metadata.py``: ``ss_network_dim``/``ss_network_alpha`` and the ``blora_*`` keys.
- ``safefile.py``: every read and write of a weights file (atomic writes, kohya's hashes, the pickle policy).
- ``writes.py``: what became of each file a command set out to write (for a true last line after Ctrl-C or
  SIGTERM), and SIGTERM treated as Ctrl-C while a temporary file exists.
- ``measure.py``: thread count, progress bars, per-layer norms.
"""
