"""featcache: run frozen backbones once into a verifiable Zarr cache; train heads from it."""

__version__ = "0.1.0"
