"""Audio decoding for the speech backbones: soundfile, mono mix, polyphase resampling to 16 kHz.

Frames of a wav2vec2-style encoder: 20 ms apart (320 samples at 16 kHz), each seeing 400
samples (25 ms).  An utterance of L samples gives ``n_frames(L) = floor((L - 400) / 320) + 1``
frames (0 below 400 samples).  Frame t spans samples [320 t, 320 t + 400); its label is 1 when
its centre, ``(320 t + 200) / 16000`` seconds, lies inside a spoofed interval ``[start, end)``
of the manifest's ``segments`` column (``0.50-1.20;2.00-2.40``).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from ..errors import ManifestError

SAMPLE_RATE = 16000
FRAME_HOP = 320  # samples between frames (20 ms)
FRAME_WINDOW = 400  # samples each frame sees (25 ms): the conv feature encoder's receptive field
AUDIO_EXTENSIONS = (".wav", ".flac")


def read_audio(path: str, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """Decode an audio file to a float32 mono signal at ``sample_rate``.

    Channels are averaged; other rates are resampled with :func:`resample`; with
    ``max_seconds`` the signal is cut after that many seconds (after resampling).
    """
    import soundfile as sf

    data, rate = sf.read(path, dtype="float32", always_2d=True)
    x = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if rate != sample_rate:
        x = resample(x, rate, sample_rate)
    if max_seconds is not None and max_seconds > 0:
        x = x[: int(round(max_seconds * sample_rate))]
    return np.ascontiguousarray(x, dtype=np.float32)


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Polyphase resampling (``scipy.signal.resample_poly``) by the reduced ratio rate_out / rate_in."""
    from scipy.signal import resample_poly

    ratio = Fraction(int(rate_out), int(rate_in))
    return resample_poly(np.asarray(x, dtype=np.float64), ratio.numerator, ratio.denominator).astype(np.float32)


def n_frames(n_samples: int) -> int:
    """Frames a wav2vec2 feature encoder makes of ``n_samples`` samples at 16 kHz."""
    return 0 if n_samples < FRAME_WINDOW else (n_samples - FRAME_WINDOW) // FRAME_HOP + 1


def frame_centres(count: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Centre time in seconds of each of ``count`` frames."""
    return (np.arange(count) * FRAME_HOP + FRAME_WINDOW / 2) / sample_rate


def parse_segments(text: str, source: str = "segments") -> list[tuple[float, float]]:
    """``"0.50-1.20;2.00-2.40"`` -> [(0.5, 1.2), (2.0, 2.4)]; empty -> []."""
    text = "" if text is None else str(text).strip()
    if text == "" or text.lower() == "nan":
        return []
    out = []
    for piece in text.split(";"):
        piece = piece.strip()
        if not piece:
            continue
        try:
            a, b = (float(v) for v in piece.split("-"))
        except ValueError:
            raise ManifestError(f"{source}: {piece!r} is not an interval START-END in seconds, e.g. 0.50-1.20") from None
        if not (math.isfinite(a) and math.isfinite(b)) or a < 0 or b <= a:
            raise ManifestError(f"{source}: interval {piece!r} must have 0 <= start < end")
        out.append((a, b))
    return out


def format_segments(intervals) -> str:
    return ";".join(f"{a:.2f}-{b:.2f}" for a, b in intervals)


def frame_labels(count: int, segments: str | list[tuple[float, float]], utterance_label: int = -1) -> np.ndarray:
    """Label of each frame: 1 when its centre lies in a spoofed interval [start, end), else 0.

    Without intervals, a bonafide utterance (label 0) has all frames 0; a spoofed utterance
    without intervals is unknown frame by frame (-1), since it may be spoofed only in part.
    """
    intervals = parse_segments(segments) if isinstance(segments, str) or segments is None else list(segments)
    if not intervals:
        return np.full(count, 0 if utterance_label == 0 else -1, dtype=np.int8)
    centres = frame_centres(count)
    inside = np.zeros(count, dtype=bool)
    for a, b in intervals:
        inside |= (centres >= a) & (centres < b)
    return inside.astype(np.int8)
