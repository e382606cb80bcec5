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
            x = self.transform(read_rgb(self.paths[row]))
            return row, x, ""
        except Exception as exc:  # any decoding failure is data, not a crash
            return row, torch.zeros(self.shape), f"{type(exc).__name__}: {exc}"


def collate_images(batch):
    rows = np.array([b[0] for b in batch], dtype=np.int64)
    x = torch.stack([b[1] for b in batch])
    errors = [b[2] for b in batch]
    return rows, x, errors


def read_rgb(path) -> Image.Image:
    """The image at ``path``, decoded whole and in RGB (:func:`to_rgb`); the file is closed."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` in RGB, converted before any resizing (PIL's ``convert``).

    A palette image is converted to RGB here and then resized with the model's filter
    (bicubic for CLIP); open_clip's own transform resizes first and converts after, which
    resizes the palette indices with nearest neighbour. Other modes give the same pixels in
    either order up to rounding, except that PIL's conversion of a 16-bit image (``I;16``)
    clips values above 255 rather than scaling them, in open_clip's transform as here.
    """
    return img if img.mode == "RGB" else img.convert("RGB")


#: A JPEG that torchvision.io.decode_jpeg may decode on the GPU: baseline or progressive
#: Huffman frames (SOF0, SOF1, SOF2) with 1 or 3 components; anything else is decoded on the CPU.
_GPU_SOF = {0xC0: True, 0xC1: True, 0xC2: True}


def jpeg_gpu_decodable(data: bytes) -> bool:
    """True when ``data`` is a whole JPEG (SOI first, EOI last) whose frame a GPU decoder takes.

    Reads only the marker segments before the first frame header: a truncated file (no EOI),
    a CMYK or arithmetic-coded JPEG, or anything that is not a JPEG returns False, and is then
    decoded (or refused, and recorded) by PIL on the CPU like any other image.
    """
    if len(data) < 4 or data[:3] != b"\xff\xd8\xff" or data.rstrip(b"\x00\r\n ")[-2:] != b"\xff\xd9":
        return False
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if marker not in _GPU_SOF or i + 10 > len(data):
                return False
            return data[i + 9] in (1, 3)
        if marker == 0xDA:  # scan before any frame header
            return False
        i += 2 + length
    return False


class Uint8Images(torch.utils.data.Dataset):
    """Decode image files to uint8 CHW tensors of one size: RGB first, then ``geometry`` on uint8.

    ``geometry`` holds PIL operations (resize, crop) that end at ``size`` (h, w); no float
    conversion happens here: a batch travels to the device as uint8, a quarter of float32's
    bytes, and normalisation runs there. Items are ``(row, x, error)`` as in
    :class:`ImageFiles`; ``x`` is a zero image where the file could not be read.

    With ``jpeg_bytes=True`` a JPEG that :func:`jpeg_gpu_decodable` accepts is not decoded:
    its bytes travel instead, as a 1-D uint8 tensor, for ``torchvision.io.decode_jpeg`` on
    the GPU; every other file is decoded here.
    """

    def __init__(self, paths: list[str], geometry: Callable, size: tuple[int, int], *, jpeg_bytes: bool = False):
        self.paths = list(paths)
        self.geometry = geometry
        self.size = (int(size[0]), int(size[1]))
        self.jpeg_bytes = jpeg_bytes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int):
        try:
            if self.jpeg_bytes:
                with open(self.paths[row], "rb") as fh:
                    data = fh.read()
                if jpeg_gpu_decodable(data):
                    return row, torch.frombuffer(bytearray(data), dtype=torch.uint8), ""
            a = np.asarray(self.geometry(read_rgb(self.paths[row])))
            if a.shape != (*self.size, 3) or a.dtype != np.uint8:
                raise ValueError(f"preprocessing gave {a.dtype} {a.shape}, expected uint8 {(*self.size, 3)}")
            return row, torch.from_numpy(a.transpose(2, 0, 1).copy()), ""
        except Exception as exc:  # any decoding failure is data, not a crash
            return row, torch.zeros((3, *self.size), dtype=torch.uint8), f"{type(exc).__name__}: {exc}"


def collate_uint8(batch):
    """``(rows, (pixels, jpegs), errors)``: pixels (n, 3, h, w) uint8, with zeros where ``jpegs``
    (a list of (index in batch, JPEG bytes)) holds a still-encoded image for the device."""
    rows = np.array([b[0] for b in batch], dtype=np.int64)
    size = next((tuple(b[1].shape[1:]) for b in batch if b[1].ndim == 3), None)
    jpegs = [(i, b[1]) for i, b in enumerate(batch) if b[1].ndim == 1]
    if size is None:
        pixels = torch.zeros((len(batch), 3, 0, 0), dtype=torch.uint8)
    else:
        pixels = torch.stack([b[1] if b[1].ndim == 3 else torch.zeros((3, *size), dtype=torch.uint8) for b in batch])
    return rows, (pixels, jpegs), [b[2] for b in batch]
