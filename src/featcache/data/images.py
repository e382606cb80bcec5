"""Image decoding for extraction: one item per manifest row, failures reported, never raised."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image


class ImageFiles(torch.utils.data.Dataset):
    """Decode image files with a transform; an unreadable file yields a zero tensor and an error.

    Items are ``(row, tensor, error)`` with ``error == ''`` when the file was read; the
    extraction runner records the others in ``errors.jsonl`` (or stops, with ``--on-error raise``).
    """

    def __init__(self, paths: list[str], transform: Callable, shape: tuple[int, ...]):
        self.paths = list(paths)
        self.transform = transform
        self.shape = shape

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int):
        try:
            with Image.open(self.paths[row]) as img:
                img.load()
                x = self.transform(img.convert("RGB"))
            return row, x, ""
        except Exception as exc:  # any decoding failure is data, not a crash
            return row, torch.zeros(self.shape), f"{type(exc).__name__}: {exc}"


def collate_images(batch):
    rows = np.array([b[0] for b in batch], dtype=np.int64)
    x = torch.stack([b[1] for b in batch])
    errors = [b[2] for b in batch]
    return rows, x, errors
