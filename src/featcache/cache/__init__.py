"""The feature cache: writer (parts, resume, lock, fingerprint), reader, verify, export."""

from .export import export_h5
from .reader import CacheData, FeatureCache, open_cache
from .store import DEFAULT_PART_ROWS, CacheLock, CacheSpec, CacheWriter, fingerprint
from .verify import VerifyReport, cache_info, format_info, verify_cache

__all__ = [
    "CacheData", "CacheLock", "CacheSpec", "CacheWriter", "DEFAULT_PART_ROWS", "FeatureCache",
    "VerifyReport", "cache_info", "export_h5", "fingerprint", "format_info", "open_cache", "verify_cache",
]
