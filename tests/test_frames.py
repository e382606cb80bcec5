"""`featcache frames`: videos -> the frame tree the adapters read, resumable, corrupt videos recorded."""

from __future__ import annotations

import av
import numpy as np
import pytest

from featcache.cli import main as cli_main
from featcache.data.adapters import build_manifest
from featcache.data.frames import FAILED_CSV, extract_frames, frame_folder
from featcache.errors import FeatcacheError

N_FRAMES, RATE = 10, 5  # a 2-second video at 5 fps


def write_video(path, n=N_FRAMES, rate=RATE, size=16):
    """A tiny MPEG-4 video whose frame i is filled with the grey level 20 * i."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 20 * i, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture
def ffpp_videos(tmp_path):
    # the FF++ download script's layout: original_sequences/youtube/c23/videos/<id>.mp4
    root = tmp_path / "FaceForensics++"
    write_video(root / "original_sequences/youtube/c23/videos/000.mp4")
    corrupt = root / "original_sequences/youtube/c23/videos/001.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    return root


def test_every_k_writes_the_frame_tree_the_ffpp_adapter_reads(ffpp_videos, tmp_path):
    out = tmp_path / "out"
    r = extract_frames(ffpp_videos, out, every=3)
    folder = out / "original_sequences/youtube/c23/frames/000"
    assert sorted(p.name for p in folder.glob("*.png")) == ["000000.png", "000003.png", "000006.png", "000009.png"]
    assert (r.videos, r.done, r.frames, r.skipped) == (2, 1, 4, 0)
    # the corrupt video is recorded, counted, and leaves no partial folder
    assert [f[0] for f in r.failed] == ["original_sequences/youtube/c23/videos/001.mp4"]
    assert (out / FAILED_CSV).read_text().splitlines()[1].startswith("original_sequences/youtube/c23/videos/001.mp4,")
    assert not (out / "original_sequences/youtube/c23/frames/001").exists()
    assert not list(out.rglob("*.partial"))
    # frame 6's grey level survives the codec (to within compression)
    from PIL import Image
    grey = np.asarray(Image.open(folder / "000006.png").convert("L"), dtype=float).mean()
    assert abs(grey - 120) < 6
    # resumable: the finished video is skipped, the corrupt one is tried again and still recorded
    again = extract_frames(ffpp_videos, out, every=3)
    assert (again.done, again.skipped, len(again.failed), again.frames) == (0, 1, 1, 0)
    m = build_manifest("ffpp", out, tmp_path / "m.csv")
    assert len(m.df) == 4 and set(m.df["identity"]) == {"000"} and (m.df["label"] == 0).all()


def test_fps_keeps_one_frame_per_second_and_the_cli_reports(ffpp_videos, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as done:
        cli_main(["frames", str(ffpp_videos), str(out), "--fps", "1", "-q"])
    assert done.value.code == 0
    names = sorted(p.name for p in (out / "original_sequences/youtube/c23/frames/000").glob("*.png"))
    assert names == ["000000.png", f"{RATE:06d}.png"]  # t = 0 s and t = 1 s
    text = capsys.readouterr().out
    assert "2 video(s): 1 extracted (2 frames), 0 already done, 1 unreadable" in text


def test_frames_options_are_checked(tmp_path):
    write_video(tmp_path / "v/a.mp4", n=2)
    with pytest.raises(FeatcacheError, match="exactly one of --fps"):
        extract_frames(tmp_path / "v", tmp_path / "o")
    with pytest.raises(FeatcacheError, match="exactly one of --fps"):
        extract_frames(tmp_path / "v", tmp_path / "o", fps=1, every=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatcacheError, match="no video files"):
        extract_frames(tmp_path / "empty", tmp_path / "o", fps=1)
    with pytest.raises(FeatcacheError, match="--every must be at least 1"):
        extract_frames(tmp_path / "v", tmp_path / "o", every=0)


def test_frame_folders_follow_the_deepfakebench_layouts(tmp_path):
    # FF++: <comp>/videos/<id>.mp4 -> <comp>/frames/<id>/; Celeb-DF: <folder>/<video>.mp4 -> <folder>/frames/<video>/
    v, o = tmp_path / "v", tmp_path / "o"
    assert frame_folder(v / "manipulated_sequences/Deepfakes/c23/videos/000_003.mp4", v, o) == \
        o / "manipulated_sequences/Deepfakes/c23/frames/000_003"
    assert frame_folder(v / "Celeb-synthesis/id0_id16_0000.mp4", v, o) == o / "Celeb-synthesis/frames/id0_id16_0000"


def test_celebdf_videos_become_frames_the_celebdf_adapter_reads(tmp_path):
    # SelfBlendedImages' Celeb-DF layout (Celeb-real/videos/*.mp4), frames written next to the videos
    root = tmp_path / "Celeb-DF-v2"
    write_video(root / "Celeb-real/videos/id0_0000.mp4", n=4)
    write_video(root / "Celeb-synthesis/videos/id0_id1_0000.mp4", n=4)
    write_video(root / "YouTube-real/videos/00170.mp4", n=4)
    (root / "List_of_testing_videos.txt").write_text("1 YouTube-real/00170.mp4\n")
    assert extract_frames(root, root, every=2).frames == 6
    m = build_manifest("celebdf", root, tmp_path / "m.csv")
    assert len(m.df) == 6 and m.df["path"].str.contains("/frames/").all()
    assert set(m.df.loc[m.df["split"] == "test", "path"].str.split("/").str[-2]) == {"00170"}
    assert any(n.startswith("skipped 3 video file(s)") for n in m.notes)
