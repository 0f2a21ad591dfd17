"""``blora-network``: parse the command line, call one library function, print its result.

- ``main.py``: ``main``, the parser, the subcommand table; the stdout, ``--json`` and exit-status contract.
- ``subcommand.py``: the :class:`Subcommand` unit (arguments beside handler) and the text helpers handlers share.
- ``files.py``: inspect, analyze, split, combine, scale, extract, convert.
- ``training.py``: presets, plan, demo, recipe, check.
- ``args.py``: the argument types and actions the subcommands share.

Nothing below this layer prints; nothing here does the work.
"""
