"""Frozen backbones behind one registry, and the extraction runner."""

from .registry import Backbone, get_backbone, list_backbones, register_backbone
from .runner import ExtractResult, extract

__all__ = ["Backbone", "ExtractResult", "extract", "get_backbone", "list_backbones", "register_backbone"]
