"""CLIP extraction into the cache: features, resume after kill -9, errors, staleness, locking, weights."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import array_hashes, run_cli, write_image_manifest
from PIL import Image

from featcache.cache import CacheLock, open_cache, verify_cache
from featcache.errors import BackboneError, CacheLockedError, SampleError, StaleCacheError
from featcache.extract import extract, get_backbone

KW = dict(model="tiny", batch_size=8, part_rows=16, num_workers=0, progress=False)


def direct_features(model_visual, transform, paths):
    """The frozen encoder run by hand on the same images, one at a time."""
    with torch.no_grad():
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        return model_visual.eval()(x).numpy()


def test_features_equal_the_bare_encoder_and_failures_are_recorded(images, tmp_path):
    r = extract("clip", images, tmp_path / "c", **KW)
    assert (r.rows, r.parts_total, r.failed) == (40, 3, 2)
    cache = open_cache(tmp_path / "c")
    assert cache.dim == 64 and cache.kind == "pooled"
    ok = cache.load_rows("ok")
    assert ok.sum() == 38 and not ok[5] and not ok[22]
    errors = {e["sample_id"]: e["error"] for e in cache.errors()}
    assert set(errors) == {"s0005", "s0022"}
    assert "UnidentifiedImageError" in errors["s0005"]

    bb = get_backbone("clip", "tiny")
    paths = [str(images.parent / f"img/{i:04d}.png") for i in range(40) if i not in (5, 22)]
    want = direct_features(bb.module, bb.transform, paths)
    got = cache.load_rows("features", dtype=np.float32)[ok]
    np.testing.assert_allclose(got, want.astype(np.float16).astype(np.float32), rtol=0, atol=2e-3)
    assert np.all(cache.load_rows("features")[~ok] == 0)
    assert verify_cache(tmp_path / "c").ok


def test_on_error_raise_stops_at_the_corrupt_image(images, tmp_path):
    with pytest.raises(SampleError, match="s0005"):
        extract("clip", images, tmp_path / "c", on_error="raise", **KW)


def test_stale_fingerprint_is_refused_naming_what_changed(images, tmp_path):
    extract("clip", images, tmp_path / "c", **KW)
    before = array_hashes(tmp_path / "c")
    with pytest.raises(StaleCacheError, match=r"backbone\.model: 'tiny' in the cache, 'small' now"):
        extract("clip", images, tmp_path / "c", **{**KW, "model": "small"})
    with pytest.raises(StaleCacheError, match="part_rows"):
        extract("clip", images, tmp_path / "c", **{**KW, "part_rows": 8})
    changed = images.parent / "changed.csv"
    changed.write_text(images.read_text().replace("s0000", "x0000"))
    with pytest.raises(StaleCacheError, match="manifest's contents changed"):
        extract("clip", changed, tmp_path / "c", **KW)
    assert array_hashes(tmp_path / "c") == before  # refused, and nothing was touched
    r = extract("clip", changed, tmp_path / "c", overwrite=True, **KW)
    assert r.parts_written == 3 and open_cache(tmp_path / "c").meta()["sample_id"][0] == "x0000"


def test_rerun_of_a_complete_cache_computes_nothing(images, tmp_path):
    extract("clip", images, tmp_path / "c", **KW)
    r = extract("clip", images, tmp_path / "c", **KW)
    assert (r.parts_written, r.parts_resumed, r.failed) == (0, 3, 2)


def test_not_a_cache_is_never_overwritten(images, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "thesis.tex").write_text("precious")
    with pytest.raises(Exception, match="not a featcache cache"):
        extract("clip", images, tmp_path / "data", overwrite=True, **KW)
    assert (tmp_path / "data" / "thesis.tex").read_text() == "precious"


def _parts_done(out) -> int:
    parts = out / "parts"
    return sum(d.name.isdigit() for d in parts.iterdir()) if parts.is_dir() else 0


# The child runs the CLI with its writer thread held after a given number of whole parts: it
# prints "paused <n>" and waits, its main thread still running, until the run is aborted. So the
# signal lands mid-run, at a part count the test chose, however fast or slow the machine is.
_PAUSED_CHILD = """
import signal, sys, time
# Ctrl-C as in a terminal: a suite started in the background (a non-interactive shell's `cmd &`) hands its
# children SIGINT ignored, and Python then installs no KeyboardInterrupt handler
signal.signal(signal.SIGINT, signal.default_int_handler)
from featcache.extract import runner
stop_after, handle = int(sys.argv[1]), runner._Writer._handle
def held(self, *a):
    handle(self, *a)
    done = len(self.writer.done_parts())
    if done >= stop_after:
        print(f"paused {done}", flush=True)
        while not self.abort:
            time.sleep(0.01)
runner._Writer._handle = held
sys.argv = ["featcache", *sys.argv[2:]]
from featcache.cli import main
main()
"""


def _start_paused(args, out, after_parts: int) -> subprocess.Popen:
    """The CLI in a child process, held after ``after_parts`` whole parts (see ``_PAUSED_CHILD``)."""
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED_CHILD, str(after_parts), *map(str, args),
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # blocks until the child holds; no clock involved
    assert line.startswith("paused "), f"the child ended before pausing: {proc.communicate()}"
    return proc


def test_ctrl_c_and_kill_9_then_resume_give_identical_arrays(tmp_path):
    manifest = write_image_manifest(tmp_path / "data", 100, corrupt={17, 83})
    args = ["extract", "--backbone", "clip", "--model", "tiny", "--manifest", manifest, "--part-rows", 10,
            "--batch-size", 5, "--num-workers", 0, "-q"]
    # The uninterrupted reference, in-process.
    extract("clip", manifest, tmp_path / "straight", model="tiny", part_rows=10, batch_size=5,
            num_workers=0, progress=False)
    out = tmp_path / "interrupted"

    # Ctrl-C mid-run (the child holds after 3 of 10 parts); meanwhile a second writer is refused.
    proc = _start_paused(args, out, 3)
    with pytest.raises(CacheLockedError, match="another process"):
        extract("clip", manifest, out, model="tiny", part_rows=10, batch_size=5, num_workers=0, progress=False)
    proc.send_signal(signal.SIGINT)
    # communicate, not wait: the child's pipes are drained while it ends (a full stderr pipe would hold
    # it); a child that does not end is killed and its output shown
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out_, err = proc.communicate()
        pytest.fail(f"the child did not end within 120 s of Ctrl-C; stdout: {out_[-2000:]!r}; stderr: {err[-4000:]!r}")
    assert proc.returncode == 130, err
    assert "rerun the same command to resume" in err
    assert _parts_done(out) == 3

    # Resume, then kill -9 after 6 parts: the kernel releases the dead writer's lock.
    proc = _start_paused(args, out, 6)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert _parts_done(out) == 6
    assert not json.loads((out / "zarr.json").read_text())["attributes"]["complete"]
    report = verify_cache(out)
    assert not report.ok and "incomplete" in report.problems[0]

    resumed = run_cli(*args, "--out", out)
    assert "6 already there" in resumed.stdout
    assert array_hashes(out) == array_hashes(tmp_path / "straight")
    assert open_cache(out).errors() == open_cache(tmp_path / "straight").errors()
    assert verify_cache(out).ok


def test_a_half_written_part_is_redone(images, tmp_path):
    extract("clip", images, tmp_path / "c", **KW)
    want = array_hashes(tmp_path / "c")
    parts = tmp_path / "c" / "parts"
    os.rename(parts / "00001", parts / "00001.tmp")  # as if killed before the rename
    (parts / "00001.tmp" / "features" / "zarr.json").write_text("{garbage")
    r = extract("clip", images, tmp_path / "c", **KW)
    assert (r.parts_written, r.parts_resumed) == (1, 2)
    assert array_hashes(tmp_path / "c") == want
    assert not (parts / "00001.tmp").exists()


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(images, tmp_path):
    extract("clip", images, tmp_path / "c", **KW)
    before = array_hashes(tmp_path / "c")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from featcache.cache import CacheLock; CacheLock(sys.argv[1]).acquire(); "
         "print('locked', flush=True); time.sleep(60)", str(tmp_path / "c")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CacheLockedError, match="being written by another process"):
            extract("clip", images, tmp_path / "c", overwrite=True, **{**KW, "model": "small"})
        proc = run_cli("extract", "--backbone", "clip", "--model", "tiny", "--manifest", images,
                       "--out", tmp_path / "c", "--part-rows", 16, check=False)
        assert proc.returncode == 2
        assert proc.stderr.startswith("error: ") and "another process" in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        holder.kill()
        holder.wait()
    assert array_hashes(tmp_path / "c") == before
    # The holder died without unlocking: the lock is free again.
    with CacheLock(tmp_path / "c"):
        pass


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_local_checkpoint_gives_the_features_of_the_model_that_saved_it(images, tmp_path, fmt):
    import open_clip
    from safetensors.torch import save_file

    from featcache.extract.clip import _open_clip

    _open_clip()  # registers the offline configs
    torch.manual_seed(1234)  # weights unlike the preset's seed-0 initialisation
    model = open_clip.create_model("featcache-tiny")
    ckpt = tmp_path / f"ckpt.{fmt}"
    if fmt == "pt":
        torch.save({"state_dict": model.state_dict()}, ckpt)
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))

    r = extract("clip", images, tmp_path / "c", pretrained=str(ckpt), **KW)
    cache = open_cache(tmp_path / "c")
    assert cache.backbone["pretrained"] == str(ckpt.resolve())
    ok = cache.load_rows("ok")
    paths = [str(images.parent / f"img/{i:04d}.png") for i in range(40) if ok[i]]
    _, _, transform = open_clip.create_model_and_transforms("featcache-tiny")
    want = direct_features(model.visual, transform, paths)
    np.testing.assert_allclose(cache.load_rows("features", dtype=np.float32)[ok],
                               want.astype(np.float16).astype(np.float32), rtol=0, atol=2e-3)
    random_init = extract("clip", images, tmp_path / "r", **KW)
    assert random_init.fingerprint != r.fingerprint


def test_unloadable_weights_say_how_to_pass_a_file(tmp_path):
    with pytest.raises(BackboneError, match="--pretrained PATH"):
        get_backbone("clip", "ViT-B-32", "openai")
    with pytest.raises(BackboneError, match="does not exist"):
        get_backbone("clip", "tiny", str(tmp_path / "missing.pt"))
    with pytest.raises(BackboneError, match="unknown open_clip model"):
        get_backbone("clip", "ViT-Nonexistent")


def test_bf16_compute_is_recorded_in_the_fingerprint(images, tmp_path):
    a = extract("clip", images, tmp_path / "a", **KW)
    b = extract("clip", images, tmp_path / "b", precision="bf16", **KW)
    assert open_cache(tmp_path / "b").backbone["dtype"] == "bf16"
    assert a.fingerprint != b.fingerprint
    fa = open_cache(tmp_path / "a").load_rows("features", dtype=np.float32)
    fb = open_cache(tmp_path / "b").load_rows("features", dtype=np.float32)
    cos = (fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1) + 1e-9)
    assert np.all(cos[open_cache(tmp_path / "a").load_rows("ok")] > 0.99)
