"""Dataset adapters: a dataset folder in its public layout -> manifest rows, by modality.

- :mod:`.common`: the registry, :func:`build_manifest`, :class:`Notes`, split assignment, file
  listing and :func:`manifest_summary` (rows per split x label x subgroup or attack).
- :mod:`.faces`: folder, ffpp, celebdf, fairface, utkface, aiface, causalface, dfdc, df40.
- :mod:`.audio`: asvspoof19, asvspoof21, partialspoof.
- :mod:`.detection`: faap-coco, coco-gender.

``featcache.data.adapters`` keeps the names it had as one module.
"""

from __future__ import annotations

from . import audio, detection, faces  # noqa: F401  (register the adapters)
from .common import (
    ADAPTERS,
    AUDIO_EXTENSIONS,
    FORMAT_OPTIONS,
    IMAGE_EXTENSIONS,
    ROW_COLUMNS,
    VIDEO_EXTENSIONS,
    Adapter,
    Notes,
    assign_splits,
    build_manifest,
    check_fractions,
    list_adapters,
    list_files,
    list_images,
    manifest_summary,
    register_adapter,
)
from .detection import DETECTION_GENDERS, FAAP_GROUPS, parse_gender_map
from .faces import (
    CELEBDF_FOLDERS,
    CELEBDF_TEST_LIST,
    FAIRFACE_CSVS,
    FFPP_LABEL_COLUMNS,
    FFPP_METHODS,
    UTKFACE_KNOWN_MALFORMED,
    UTKFACE_MAX_MALFORMED,
)

__all__ = [
    "ADAPTERS", "AUDIO_EXTENSIONS", "CELEBDF_FOLDERS", "CELEBDF_TEST_LIST", "DETECTION_GENDERS", "FAAP_GROUPS",
    "FAIRFACE_CSVS", "FFPP_LABEL_COLUMNS", "FFPP_METHODS", "FORMAT_OPTIONS", "IMAGE_EXTENSIONS", "ROW_COLUMNS",
    "UTKFACE_KNOWN_MALFORMED", "UTKFACE_MAX_MALFORMED", "VIDEO_EXTENSIONS", "Adapter", "Notes", "assign_splits",
    "build_manifest", "check_fractions", "list_adapters", "list_files", "list_images", "manifest_summary",
    "parse_gender_map", "register_adapter",
]
