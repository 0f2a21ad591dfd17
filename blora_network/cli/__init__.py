"""``blora-network``: parse the command line, call one library function, print its result.

- ``main.py``: ``main``, the parser and the subcommand table; the stdout, ``--json`` and exit-status contract.
- ``args.py``: the command line's argument types.

Nothing below this layer prints; nothing here does the work.
"""
