"""blora_network: B-LoRA for kohya-ss/sd-scripts, on LyCORIS.

Train with ``--network_module=blora_network --network_args "preset=content_style"``.
sd-scripts looks up the two entry points below on this module; they are imported on first
use so that the command-line tools start without loading LyCORIS.
"""

__version__ = "0.1.0"

__all__ = ["create_network", "create_network_from_weights", "__version__"]


def __getattr__(name):
    if name in ("create_network", "create_network_from_weights"):
        from blora_network.network import kohya as network

        return getattr(network, name)
    raise AttributeError(f"module 'blora_network' has no attribute {name!r}")
