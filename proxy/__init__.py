"""A caching pull-through proxy for LXD and Incus images."""

__version__ = "0.1.0"
