"""The ``--network_module`` that sd-scripts drives (``blora_network.create_network`` loads ``kohya.py``).

- ``kohya.py``: :class:`BLoRANetwork` (a LyCORIS kohya network) and ``create_network``,
  ``create_network_from_weights``, ``network_options``; named like ``lycoris/kohya.py``, which it builds on.
- ``options.py``: the ``--network_args`` keys, typed, and their LyCORIS names.
- ``presets.py`` and ``builtin_presets/*.toml``: built-in names, preset files, their validation.
- ``modelcheck.py``: does a preset match this UNet, and what the UNet is if not.
- ``guards.py``: the LyCORIS faults found by probing it, and how the network avoids them.
- ``merge.py``: exact merging (``--base_weights``, ``--network_merge``, pre-calculation).
- ``regions.py``: regional prompts in sd-scripts' image scripts.
- ``hostcalls.py``: every method sd-scripts calls on a network, in order (the tests walk it).

This ``__init__`` imports nothing, so ``check`` reads options and presets without loading torch.
"""
