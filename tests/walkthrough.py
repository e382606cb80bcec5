"""Run the README's walkthrough as written, offline, in a temporary folder (``make walkthrough``).

The ```bash blocks of the section "## Walkthrough" are joined into one script run by
``bash -euo pipefail``; after each ``featcache`` command a check that its output exists is
inserted, so a step that exits 0 without writing what the next step reads fails here, naming it.
Nothing is substituted: the README's commands are already small. ``featcache`` resolves to the
entry point next to this Python (the venv's ``bin`` goes first on the PATH).

Usage: python tests/walkthrough.py [--keep DIR] [--print]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Walkthrough"


def walkthrough_blocks(readme: Path = README) -> list[str]:
    """The ```bash blocks between the walkthrough's heading and the next ``## `` heading."""
    text = readme.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end >= 0 else None]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def commands(blocks: list[str]) -> list[str]:
    """Logical lines (continuations joined), comments and blank lines dropped."""
    out: list[str] = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def expected_outputs(line: str) -> list[str]:
    """What a ``featcache`` command line must leave behind (paths relative to the folder)."""
    words = shlex.split(line, comments=True)
    if not words or words[0] != "featcache":
        return []
    args = [w for w in words[1:] if w not in ("-q", "--quiet")]
    out = [args[i + 1] for i, w in enumerate(args[:-1]) if w in ("--out", "-o", "--h5")]
    cmd = args[0]
    positional = [w for w in args[1:] if not w.startswith("-")]
    if cmd == "synth":
        out.append(f"{positional[1]}/{'zarr.json' if positional[0] == 'features' else 'manifest.csv'}")
    elif cmd == "extract" or cmd == "cache" and positional[:1] == ["verify"]:
        cache = out[0] if cmd == "extract" else positional[1]
        out = [f"{cache}/zarr.json"]
    elif cmd == "evaluate":
        other = next((args[i + 1] for i, w in enumerate(args[:-1]) if w == "--cache"), None)
        name = next((args[i + 1] for i, w in enumerate(args[:-1]) if w == "--name"), None)
        name = name or (other.rstrip("/").rsplit("/", 1)[-1] if other else None)
        out.append(f"{positional[0]}/eval/{name + '_' if name else ''}test/metrics.json")
    elif cmd == "calibrate":
        out.append(f"{positional[0]}/calibration_temp.json")
    elif cmd == "analyze" and positional[:1] == ["prototypes"]:
        out.append(f"{positional[1]}/prototypes/prototypes.json")
    elif cmd in ("train-head", "train-e2e", "finetune-detr"):
        out = [f"{out[0]}/summary.json"] if cmd != "finetune-detr" else [f"{out[0]}/config.json"]
    elif cmd == "ablate":
        out.append(f"{out[0]}/ablation.csv")
    return out


def script(blocks: list[str]) -> str:
    lines = ["set -euo pipefail"]
    for i, line in enumerate(commands(blocks), 1):
        lines.append(f"echo \"[{i}, $SECONDS s] \"{shlex.quote(line)} >&2")
        lines.append(line)
        for path in expected_outputs(line):
            q = shlex.quote(path)
            lines.append(f"test -e {q} || {{ echo {shlex.quote(f'step {i} left no {path}: {line}')} >&2; exit 1; }}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", default=None, help="Run in this folder and keep it (default: a temporary one).")
    ap.add_argument("--print", action="store_true", help="Print the script and exit.")
    a = ap.parse_args(argv)
    text = script(walkthrough_blocks())
    if a.print:
        print(text)
        return 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    with tempfile.TemporaryDirectory(prefix="featcache-walkthrough-") as tmp:
        folder = Path(a.keep) if a.keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        rc = subprocess.run(["bash", "-c", text], cwd=folder, env=env, stdout=subprocess.DEVNULL).returncode
        seconds = time.perf_counter() - t0
    print(f"walkthrough: {len(commands(walkthrough_blocks()))} commands, "
          f"{'passed' if rc == 0 else f'FAILED (exit {rc})'} in {seconds:.0f} s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
