"""The file tools: plain functions that read and write LoRA files and return dataclasses; they never print.

- ``transforms.py``: split, combine, scale, extract, convert.
- ``inspection.py``: what a file holds, block by block, and what looks wrong with it.
- ``analyze.py`` and ``plot.py``: where a LoRA puts its change, and the chart of it.
- ``blockweights.py``: the block-weight vectors for A1111/Forge (LoRA Block Weight) and ComfyUI (Inspire Pack).
- ``plan.py``: what a preset selects on sd-scripts' full-size UNet, before training.
- ``demo.py``: a B-LoRA trained end to end on a tiny UNet, in under a minute.
"""
