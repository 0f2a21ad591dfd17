"""The run around the network: what sd-scripts reads, written (``recipe``) and checked (``check``).

- ``args.py`` (no torch): sd-scripts' training options, how it reads a config file and a command line.
- ``images.py``: an image folder as sd-scripts' DreamBooth reader sees it.
- ``recipe.py``: a folder of images -> the paper's sd-scripts run: two config files, a GUI preset, one command.
- ``check.py``: a training config or command line, read for every B-LoRA mistake before the run.
- ``kohya_gui.py`` (no torch): the kohya_ss GUI's saved configs and presets, read as the sd-scripts run they
  start (its command, its TOML, its traps), and the preset ``recipe`` writes for it.
"""
