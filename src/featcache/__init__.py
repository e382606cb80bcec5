"""featcache: run frozen backbones once into a verifiable Zarr cache; train heads from it.

The Python surface (``featcache.__all__``, documented in :mod:`featcache.api`)::

    import featcache
    featcache.extract_features("clip", "data/faces/manifest.csv", "caches/faces", model="small", pretrained="none")
    run = featcache.train_head("stage2", "caches/faces", "runs/s2", preset="cvar")
    featcache.load_run("runs/s2").metric("test", "auc")

The names are loaded on first use (PEP 562), so ``import featcache`` and ``featcache --help`` do not
import torch.
"""

__version__ = "0.1.0"

__all__ = ["Run", "ablate", "evaluate", "extract_features", "load_run", "open_cache", "train_head", "verify_cache"]


def __getattr__(name: str):
    if name in __all__:
        from . import api  # the facade: the one import that runs up the layers (tests/test_layers.py)

        return getattr(api, name)
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
