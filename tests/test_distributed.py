"""Distributed extraction: two CPU processes (Gloo) run `python -m featcache extract` as torchrun would."""

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import array_hashes, write_image_manifest

from featcache.cache import CacheLock, open_cache, verify_cache
from featcache.errors import CacheLockedError
from featcache.extract import extract

PART_ROWS, BATCH = 4, 2
KW = dict(model="tiny", batch_size=BATCH, part_rows=PART_ROWS, num_workers=0, progress=False, device="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `python -m featcache`, except that decoding row BLOCK_ROW never returns: the rank reading it
# stops there, deterministically, until it is killed.
BLOCKING_CLI = """
import runpy, sys, threading
from featcache.data.images import Uint8Images
read = Uint8Images.__getitem__
def blocked(self, row):
    if row == BLOCK_ROW:
        threading.Event().wait()
    return read(self, row)
Uint8Images.__getitem__ = blocked
runpy.run_module("featcache", run_name="__main__", alter_sys=True)
"""


def start_ranks(manifest, out, world: int = 2, extra=(), timeout_s: int = 60,
                block_row: int | None = None) -> list[subprocess.Popen]:
    """What torchrun does for one node: one process per rank, with the rendezvous in the environment."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                   FEATCACHE_DIST_TIMEOUT=str(timeout_s), OMP_NUM_THREADS="1")
        launch = ["-m", "featcache"] if block_row is None else [
            "-c", BLOCKING_CLI.replace("BLOCK_ROW", str(block_row))]
        procs.append(subprocess.Popen(
            [sys.executable, *launch, "extract", "--backbone", "clip", "--model", "tiny",
             "--manifest", str(manifest), "--out", str(out), "--part-rows", str(PART_ROWS),
             "--batch-size", str(BATCH), "--num-workers", "0", "--device", "cpu", "-q", *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout=300) -> list[tuple[int, str, str]]:
    return [(p.wait(timeout), p.stdout.read(), p.stderr.read()) for p in procs]


def test_two_ranks_write_the_same_cache_as_one_process(tmp_path):
    manifest = write_image_manifest(tmp_path / "data", 30, corrupt={9})
    procs = start_ranks(manifest, tmp_path / "dist")
    extract("clip", manifest, tmp_path / "single", **KW)  # meanwhile, the single-process reference
    results = finish(procs)
    assert [rc for rc, _, _ in results] == [0, 0], results
    (_, out0, _), (_, out1, _) = results
    assert "30 samples in 8 parts (8 written)" in out0 and "1 unreadable" in out0
    assert out1 == ""  # the summary is rank 0's alone
    assert array_hashes(tmp_path / "dist") == array_hashes(tmp_path / "single")
    cache = open_cache(tmp_path / "dist")
    assert cache.attrs["complete"] and [e["sample_id"] for e in cache.errors()] == ["s0009"]
    assert verify_cache(tmp_path / "dist").ok
    assert not (tmp_path / "dist" / ".lock").exists()


def _parts(out) -> set[int]:
    d = out / "parts"
    return {int(p.name) for p in d.iterdir() if p.name.isdigit()} if d.is_dir() else set()


def test_rank_killed_mid_run_is_reported_and_one_process_resumes_it(tmp_path):
    manifest = write_image_manifest(tmp_path / "data", 40)
    extract("clip", manifest, tmp_path / "single", **KW)
    # Row 20 opens part 5, rank 1's third part (rank 1 takes parts 1, 3, 5, 7, 9): rank 1
    # stops there after writing parts 1 and 3, and rank 0 waits for it after its own parts.
    out = tmp_path / "dist"
    rank0, rank1 = procs = start_ranks(manifest, out, timeout_s=30, block_row=20)
    deadline = time.time() + 300  # a guard only: the loop ends when rank 1 blocks
    while _parts(out) != {0, 1, 2, 3, 4, 6, 8} and time.time() < deadline and rank1.poll() is None:
        time.sleep(0.02)
    assert _parts(out) == {0, 1, 2, 3, 4, 6, 8}, "rank 1 should be blocked in part 5"

    # The run holds the lock: a foreign writer is refused, and so is a rank of another run.
    with pytest.raises(CacheLockedError, match="another process"):
        extract("clip", manifest, out, **KW)
    with pytest.raises(CacheLockedError, match="cannot join distributed run"):
        CacheLock(out).join("another-run")

    rank1.send_signal(signal.SIGKILL)
    (rc0, _, err0), (rc1, _, _) = finish(procs, timeout=300)  # rank 0 is not left waiting
    assert rc1 == -signal.SIGKILL
    assert rc0 == 2 and "rank 0/2" in err0 and "rerun the same command" in err0, err0
    assert not open_cache(out, require_complete=False).attrs["complete"]

    r = extract("clip", manifest, out, **KW)  # one process finishes the two-process run
    assert (r.parts_written, r.parts_resumed) == (3, 7)
    assert array_hashes(out) == array_hashes(tmp_path / "single")


def test_error_on_one_rank_stops_the_other_with_its_message(tmp_path):
    manifest = write_image_manifest(tmp_path / "data", 16, corrupt={6})  # row 6: part 1, rank 1's
    results = finish(start_ranks(manifest, tmp_path / "c", extra=["--on-error", "raise"]))
    (rc0, _, err0), (rc1, _, err1) = results
    assert (rc0, rc1) == (2, 2)
    assert "error: cannot read sample 's0006'" in err1
    assert "extraction failed on rank 1 of 2" in err0 and "s0006" in err0
    assert _parts(tmp_path / "c") >= {0} and 1 not in _parts(tmp_path / "c")


def test_lock_join_accepts_only_the_holders_run(tmp_path):
    (tmp_path / "c").mkdir()
    with pytest.raises(CacheLockedError, match="held by no process"):
        CacheLock(tmp_path / "c").join("r1")
    held = CacheLock(tmp_path / "c").acquire(run="r1")
    try:
        member = CacheLock(tmp_path / "c").join("r1")  # flock is per open file: a second open conflicts
        member.check()
        with pytest.raises(CacheLockedError, match="held by another process"):
            CacheLock(tmp_path / "c").join("r2")
        with pytest.raises(CacheLockedError, match="another process"):
            CacheLock(tmp_path / "c").acquire(run="r1")  # even with the token, no second holder
        fcntl.flock(held.fd, fcntl.LOCK_UN)  # rank 0 gone (the kernel drops a dead process's flock)
        with pytest.raises(CacheLockedError, match="held by no process"):
            member.check()  # so the member stops writing before another writer can come in
    finally:
        held.release()
