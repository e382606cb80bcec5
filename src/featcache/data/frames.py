"""Frames from videos with PyAV: a tree of FF++ or Celeb-DF videos becomes the frame tree the adapters read.

``extract_frames(VIDEO_ROOT, OUT, fps=N | every=K)`` walks VIDEO_ROOT for video files and writes
each video's frames as PNGs into the folder the DeepfakeBench layout puts them in:

    VIDEO_ROOT/a/b/c23/videos/000.mp4   ->  OUT/a/b/c23/frames/000/000000.png ...   (FF++)
    VIDEO_ROOT/Celeb-real/id0_0000.mp4  ->  OUT/Celeb-real/frames/id0_0000/000000.png ...   (Celeb-DF)

A video is finished when its folder holds ``.done`` (written last); a rerun skips finished videos
and redoes interrupted ones.  A video PyAV cannot decode is recorded in ``OUT/frames_failed.csv``
(path, error), counted in the result, and retried on the next run.  Frame names are the
0-based index of the frame in the video, so ``--every 10`` gives 000000, 000010, ...
"""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FeatcacheError
from .adapters.common import VIDEO_EXTENSIONS, list_files

DONE = ".done"
FAILED_CSV = "frames_failed.csv"


@dataclass
class FramesResult:
    videos: int = 0
    done: int = 0  # extracted by this run
    skipped: int = 0  # already finished by an earlier run
    frames: int = 0  # written by this run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (video relative to VIDEO_ROOT, error)
    failed_csv: str = ""

    def summary(self) -> str:
        line = (f"{self.videos} video(s): {self.done} extracted ({self.frames} frames), {self.skipped} already "
                f"done, {len(self.failed)} unreadable")
        if self.failed:
            line += f" (listed in {self.failed_csv}; first: {self.failed[0][0]}: {self.failed[0][1]})"
        return line


def frame_folder(video: Path, video_root: Path, out: Path) -> Path:
    """Where a video's frames go: ``.../videos/NAME.mp4`` -> ``.../frames/NAME/``, any other
    ``DIR/NAME.mp4`` -> ``DIR/frames/NAME/`` (DeepfakeBench's layouts)."""
    rel = video.relative_to(video_root)
    parent = rel.parent
    base = parent.parent / "frames" if parent.name == "videos" else parent / "frames"
    return out / base / video.stem


def _decode(video: Path, folder: Path, *, fps: float | None, every: int | None) -> int:
    import av

    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    written = 0
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        next_time = 0.0
        for index, frame in enumerate(container.decode(stream)):
            if every is not None:
                keep = index % every == 0
            else:
                t = float(frame.time) if frame.time is not None else index / float(stream.average_rate or 25)
                keep = t + 1e-6 >= next_time
                if keep:
                    next_time += 1.0 / fps
            if keep:
                frame.to_image().save(tmp / f"{index:06d}.png")
                written += 1
    if written == 0:
        raise ValueError("no frame decoded")
    (tmp / DONE).write_text(f"{written}\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return written


def extract_frames(video_root: str | os.PathLike, out: str | os.PathLike, *, fps: float | None = None,
                   every: int | None = None, progress: bool = False) -> FramesResult:
    """Extract frames of every video under ``video_root`` into ``out`` (see the module docstring);
    exactly one of ``fps`` (frames per second of video) and ``every`` (every K-th frame)."""
    from tqdm.auto import tqdm

    root, out = Path(video_root), Path(out)
    if not root.is_dir():
        raise FeatcacheError(f"video folder {video_root} does not exist; pass the folder holding the videos")
    if (fps is None) == (every is None):
        raise FeatcacheError("pass exactly one of --fps N (frames per second) and --every K (every K-th frame)")
    if fps is not None and not fps > 0:
        raise FeatcacheError(f"--fps must be positive, got {fps}")
    if every is not None and int(every) < 1:
        raise FeatcacheError(f"--every must be at least 1, got {every}")
    videos = list_files(root, VIDEO_EXTENSIONS)
    if not videos:
        raise FeatcacheError(f"{video_root}: no video files ({', '.join(VIDEO_EXTENSIONS)}) found")
    result = FramesResult(videos=len(videos), failed_csv=str(out / FAILED_CSV))
    out.mkdir(parents=True, exist_ok=True)
    for video in tqdm(videos, desc="frames", unit="video", disable=not progress):
        folder = frame_folder(video, root, out)
        if (folder / DONE).is_file():
            result.skipped += 1
            continue
        try:
            result.frames += _decode(video, folder, fps=fps, every=None if every is None else int(every))
            result.done += 1
        except Exception as exc:  # noqa: BLE001 -- any decoder error marks this one video unreadable
            shutil.rmtree(folder.with_name(folder.name + ".partial"), ignore_errors=True)
            message = " ".join(str(exc).split()) or type(exc).__name__
            result.failed.append((video.relative_to(root).as_posix(), message))
    failed_csv = out / FAILED_CSV
    if result.failed:
        with open(failed_csv, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "error"])
            writer.writerows(result.failed)
    elif failed_csv.exists():
        failed_csv.unlink()
    return result
