"""What SDXL's layers and B-LoRA's blocks are called. The bottom layer: imports nothing of ours but errors.

- ``names.py`` (no torch): every SDXL layer name in kohya, LDM, diffusers and PEFT spelling; a layer's
  block and kind; the block order and the width tables.
- ``blocks.py`` (no torch): the one table of SDXL blocks (LoRA Block Weight, LDM and diffusers names,
  attention or not, B-LoRA role) with its "did you mean" lookup; which blocks are content, style and
  layout; the preset regex of a block.
- ``unet.py``: the stand-in SDXL UNet with sd-scripts' module names, full size (on the meta device) or tiny,
  for tests, the demo and ``plan``.
"""
