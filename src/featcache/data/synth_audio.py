"""``featcache synth audio``: speech-like utterances with whole and partial spoofs, in real layouts.

Bonafide: a harmonic source with a moving pitch contour (1/k harmonics up to 7.6 kHz) shaped by
three moving formants, unvoiced noise bursts, pauses, and low room noise.  Spoof: the utterance
passed through a vocoder-like resynthesis: magnitude STFT smoothed across frequency (the
harmonics smear), band-limited with a low-pass roll-off near 4 kHz, a spectral tilt (an envelope change) and
the image of the band mirrored above the cut-off, then inverted with random phase.  Partial spoofs replace one or two
intervals of a bonafide utterance by its resynthesis (10 ms cross-fades) and record them.

Written (deterministic for a seed, byte for byte)::

    OUT/LA/ASVspoof2019_LA_{train,dev,eval}/flac/LA_{T,D,E}_XXXXXXX.flac        16 kHz FLAC
    OUT/LA/ASVspoof2019_LA_cm_protocols/ASVspoof2019.LA.cm.{train.trn,dev.trl,eval.trl}.txt
    OUT/PartialSpoof/database/{train,dev,eval}/con_wav/UTT.flac                 links to the above
    OUT/PartialSpoof/database/segment_labels/{train,dev,eval}_seglab_{0.02,0.16}.npy
    OUT/PartialSpoof/protocols/PartialSpoof_LA_cm_protocols/PartialSpoof.LA.cm.*.txt
    OUT/manifest.csv                                                            with `segments`

The segment labels follow PartialSpoof: one string per segment, "1" bonafide, "0" spoof.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import FeatcacheError
from ..progress import bar as tqdm
from .audio import SAMPLE_RATE, format_segments
from .manifest import write_manifest

SPLITS = (("train", "T", "train.trn"), ("val", "D", "dev.trl"), ("test", "E", "eval.trl"))
PS_SPLIT = {"train": "train", "val": "dev", "test": "eval"}
SEGLAB_RESOLUTIONS = (0.02, 0.16)
_NPERSEG, _HOP = 512, 128


def _smooth(rng: np.random.Generator, n: int, knots: int, lo: float, hi: float) -> np.ndarray:
    """A smooth random curve of ``n`` points through ``knots`` uniform values in [lo, hi]."""
    xs = np.linspace(0, n - 1, knots)
    return np.interp(np.arange(n), xs, rng.uniform(lo, hi, knots))


def _stft(x):
    from scipy.signal import stft

    return stft(x, fs=SAMPLE_RATE, nperseg=_NPERSEG, noverlap=_NPERSEG - _HOP, boundary="even")


def _istft(z, n):
    from scipy.signal import istft

    _, y = istft(z, fs=SAMPLE_RATE, nperseg=_NPERSEG, noverlap=_NPERSEG - _HOP, boundary=True)
    y = y[:n]
    return np.pad(y, (0, n - len(y)))


def bonafide_utterance(rng: np.random.Generator, seconds: float, f0_base: float) -> np.ndarray:
    """A speech-like signal: voiced syllables through moving formants, unvoiced bursts, pauses, room noise."""
    sr = SAMPLE_RATE
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    # pitch contour: declination, slow vibrato-like movement and random drift
    f0 = f0_base * (1.05 - 0.1 * t / seconds) * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(2, 5) * t
                                                                  + rng.uniform(0, 6.3)))
    f0 *= _smooth(rng, n, max(3, int(seconds * 4)), 0.85, 1.15)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = np.zeros(n)
    for k in range(1, int(7600 / f0.max()) + 1):
        voiced += np.sin(k * phase) / k
    # syllables: voiced (100-300 ms), unvoiced bursts (30-100 ms), pauses (50-250 ms)
    v_env, u_env = np.zeros(n), np.zeros(n)
    pos = int(rng.uniform(0.02, 0.1) * sr)
    while pos < n:
        kind = rng.choice(3, p=[0.6, 0.2, 0.2])
        length = int(sr * (rng.uniform(0.1, 0.3), rng.uniform(0.03, 0.1), rng.uniform(0.05, 0.25))[kind])
        seg = slice(pos, min(n, pos + length))
        m = seg.stop - seg.start
        ramp = np.sin(np.pi * np.arange(m) / max(m, 1))
        if kind == 0:
            v_env[seg] = ramp * rng.uniform(0.5, 1.0)
        elif kind == 1:
            u_env[seg] = ramp * rng.uniform(0.2, 0.5)
        pos += length
    f, _, z = _stft(voiced * v_env)
    frames = z.shape[1]
    env = np.full((len(f), frames), 0.02)
    for lo, hi, bw in ((300, 850, 90), (900, 2300, 120), (2400, 3300, 180)):
        centre = _smooth(rng, frames, max(3, int(seconds * 6)), lo, hi)
        env += np.exp(-(((f[:, None] - centre[None, :]) / bw) ** 2))
    x = _istft(z * env, n)
    fric = rng.standard_normal(n)
    _, _, zn = _stft(fric)
    hp = 1.0 / (1.0 + np.exp(-(f - 3500) / 400))  # fricatives: high-frequency noise
    x += 0.6 * _istft(zn * hp[:, None], n) * u_env
    room = np.cumsum(rng.standard_normal(n)) * 1e-4  # brown-ish room noise
    x += room - np.convolve(room, np.ones(401) / 401, mode="same") + 3e-3 * rng.standard_normal(n)
    return x / (np.abs(x).max() + 1e-9) * 0.5


def resynthesize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Vocoder-like resynthesis: magnitude smoothed across frequency, band-limited, tilted, random phase."""
    from scipy.ndimage import uniform_filter1d

    f, _, z = _stft(x)
    mag = uniform_filter1d(np.abs(z), size=9, axis=0)  # smears the harmonic structure
    cutoff = rng.uniform(3600, 4200)
    lowpass = 1.0 / (1.0 + np.exp((f - cutoff) / 150))
    tilt = (1 + f / 500.0) ** rng.uniform(1.0, 1.3)  # a flatter, brighter envelope
    mag = mag * (lowpass * tilt)[:, None]
    # imaging: the band-limited output upsampled without an anti-imaging filter mirrors the band
    # below the cut-off into the band above it (as a vocoder run at a lower rate does)
    k = int(np.searchsorted(f, cutoff))
    mirror = np.clip(2 * k - np.arange(k, len(f)), 0, len(f) - 1)
    mag[k:] += rng.uniform(0.8, 1.0) * mag[mirror]
    z_new = mag * np.exp(1j * rng.uniform(-np.pi, np.pi, size=mag.shape))
    y = _istft(z_new, len(x))
    return y * (np.sqrt(np.mean(x ** 2)) / (np.sqrt(np.mean(y ** 2)) + 1e-12))


def _crossfade_replace(x: np.ndarray, y: np.ndarray, intervals, fade: int = 160) -> np.ndarray:
    mask = np.zeros(len(x))
    for a, b in intervals:
        mask[int(a * SAMPLE_RATE):int(b * SAMPLE_RATE)] = 1.0
    ramp = np.ones(fade) / fade
    mask = np.clip(np.convolve(mask, ramp, mode="same"), 0, 1)
    return x * (1 - mask) + y * mask


def _partial_intervals(rng: np.random.Generator, seconds: float) -> list[tuple[float, float]]:
    """One or two spoofed intervals of 0.3-1.2 s on a 20 ms grid, apart, inside the utterance."""
    count = 1 if seconds < 2.5 else int(rng.integers(1, 3))
    out: list[tuple[float, float]] = []
    for _ in range(20):
        if len(out) == count:
            break
        length = min(rng.uniform(0.3, 1.2), 0.45 * seconds)
        a = round(rng.uniform(0.1, seconds - length - 0.1) / 0.02) * 0.02
        b = round((a + length) / 0.02) * 0.02
        if all(b + 0.2 < c or a > d + 0.2 for c, d in out):
            out.append((a, b))
    return sorted(out)


def seglab(seconds: float, intervals, resolution: float) -> np.ndarray:
    """PartialSpoof segment labels: '1' bonafide, '0' spoof, by majority of each segment."""
    n_seg = int(np.ceil(seconds / resolution - 1e-9))
    fine = np.arange(0, seconds, 0.001) + 0.0005  # a last, partial segment is judged on its part inside
    spoof = np.zeros(len(fine), dtype=bool)
    for a, b in intervals:
        spoof |= (fine >= a) & (fine < b)
    per = np.array([spoof[int(i * resolution * 1000):int((i + 1) * resolution * 1000)].mean() > 0.5
                    for i in range(n_seg)])
    return np.where(per, "0", "1")


def synth_audio(out, *, n: int = 120, seed: int = 0, fmt: str = "flac", min_seconds: float = 1.0,
                max_seconds: float = 6.0, progress: bool = True) -> dict:
    """Write the synthetic audio dataset to ``out``; returns a summary (counts per split and kind)."""
    import soundfile as sf

    if n < 15:
        raise FeatcacheError(f"--n must be at least 15 (every kind of utterance in every split), got {n}")
    if fmt not in ("flac", "wav"):
        raise FeatcacheError(f"--format must be flac or wav, got {fmt!r}")
    if not 0.5 <= min_seconds <= max_seconds:
        raise FeatcacheError("seconds must satisfy 0.5 <= min <= max")
    out = Path(out)
    la = out / "LA"
    ps = out / "PartialSpoof"
    master = np.random.default_rng(seed)
    speakers = {s: [(f"LA_{tag}{k:03d}", float(master.uniform(95, 230))) for k in range(4)]
                for s, tag, _ in ((s, {"train": "0", "val": "1", "test": "2"}[s], p) for s, _, p in SPLITS)}
    rows, protocol, ps_protocol, labels = [], {s: [] for s, _, _ in SPLITS}, {s: [] for s, _, _ in SPLITS}, {}
    kinds = ("bonafide", "spoof", "partial")
    for i in tqdm(range(n), desc="synth audio", unit="utt", disable=not progress):
        split, letter, _ = SPLITS[(0, 0, 0, 1, 2)[i % 5]]
        rng = np.random.default_rng([seed, i])
        kind = kinds[i % 3]  # 3 and 5 are coprime: every split gets every kind
        speaker, f0 = speakers[split][int(rng.integers(4))]
        seconds = round(float(rng.uniform(min_seconds, max_seconds)), 2)
        x = bonafide_utterance(rng, seconds, f0 * float(rng.uniform(0.92, 1.08)))
        intervals: list[tuple[float, float]] = []
        if kind == "spoof":
            intervals = [(0.0, seconds)]
            x = resynthesize(x, rng)
        elif kind == "partial":
            intervals = _partial_intervals(rng, seconds)
            x = _crossfade_replace(x, resynthesize(x, rng), intervals)
        x = np.clip(x / (np.abs(x).max() + 1e-9) * 0.6, -1, 1)
        utt = f"LA_{letter}_{i + 1:07d}"
        folder = la / f"ASVspoof2019_LA_{PS_SPLIT[split]}" / "flac"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{utt}.{fmt}"
        sf.write(path, x.astype(np.float32), SAMPLE_RATE, format=fmt.upper(), subtype="PCM_16")
        system = "-" if kind == "bonafide" else ("A01" if kind == "spoof" else "A02")
        key = "bonafide" if kind == "bonafide" else "spoof"
        protocol[split].append(f"{speaker} {utt} - {system} {key}")
        ps_protocol[split].append(f"{speaker} {utt} - {'-' if kind == 'bonafide' else system} {key}")
        labels[utt] = (split, seconds, intervals)
        link = ps / "database" / PS_SPLIT[split] / "con_wav" / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(path, link.parent), link)
        rows.append({"sample_id": utt, "path": str(path.resolve()), "label": int(kind != "bonafide"),
                     "split": split, "dataset": "synth-audio", "identity": speaker,
                     "method": "" if kind == "bonafide" else system, "segments": format_segments(intervals)})
    proto_dir = la / "ASVspoof2019_LA_cm_protocols"
    proto_dir.mkdir(parents=True, exist_ok=True)
    ps_proto = ps / "protocols" / "PartialSpoof_LA_cm_protocols"
    ps_proto.mkdir(parents=True, exist_ok=True)
    seg_dir = ps / "database" / "segment_labels"
    seg_dir.mkdir(parents=True, exist_ok=True)
    for split, _, suffix in SPLITS:
        (proto_dir / f"ASVspoof2019.LA.cm.{suffix}.txt").write_text("\n".join(protocol[split]) + "\n")
        (ps_proto / f"PartialSpoof.LA.cm.{suffix}.txt").write_text("\n".join(ps_protocol[split]) + "\n")
        for res in SEGLAB_RESOLUTIONS:
            d = {u: seglab(sec, iv, res) for u, (s, sec, iv) in labels.items() if s == split}
            np.save(seg_dir / f"{PS_SPLIT[split]}_seglab_{res}.npy", d, allow_pickle=True)
    man = write_manifest(pd.DataFrame(rows), out / "manifest.csv", source="synth audio")
    df = man.df
    kind_of = np.where(df["label"] == 0, "bonafide", np.where(df["method"] == "A01", "spoof", "partial"))
    return {"out": str(out), "utterances": len(df),
            "per_split": {s: {k: int(((df["split"] == s) & (kind_of == k)).sum()) for k in kinds}
                          for s in ("train", "val", "test")},
            "seconds": round(float(sum(v[1] for v in labels.values())), 2), "format": fmt}
