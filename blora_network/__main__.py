"""``python -m blora_network``: the same as the ``blora-network`` command."""

from .cli import main

raise SystemExit(main())
