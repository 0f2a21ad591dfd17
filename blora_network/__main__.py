"""``python -m blora_network``: the same as the ``blora-network`` command."""

from blora_network.cli.main import main

raise SystemExit(main())
