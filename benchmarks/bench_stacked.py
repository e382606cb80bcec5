"""Stacked runs vs one run at a time: Stage-2 training steps of R runs (issue 16), on one device.

    python benchmarks/bench_stacked.py [--runs 15] [--rows 2048] [--dim 768] [--batch 256] [--steps 8] [--device cpu]

Times `steps` training steps (forward, loss with every fairness term, backward, AdamW) of R stacked
runs (presets x seeds in one module) against R one-run modules stepped one after the other, on the
same batches, and prints seconds per step and the ratio. Synthetic features; nothing is written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_stacked import faces_split, make  # noqa: E402

from featcache.config import resolve_config  # noqa: E402
from featcache.heads.stage1 import Stage1Task  # noqa: E402
from featcache.heads.stage2 import Stage2Task  # noqa: E402
from featcache.heads.task import StepState  # noqa: E402


def steps(tasks, data, runs, batch, n, device):
    opts = [torch.optim.AdamW([p for p in t.module.parameters() if p.requires_grad], lr=3e-4) for t in tasks]
    per = runs // len(tasks)
    t0 = None
    for step in range(n + 1):  # step 0 warms up
        if step == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        idx = torch.stack([torch.randperm(len(data), generator=torch.Generator().manual_seed(100 * step + r))[:batch]
                           for r in range(runs)]).to(device)
        full = {k: v[idx] for k, v in data.tensors.items()}
        for i, (t, opt) in enumerate(zip(tasks, opts)):
            t.module.train()
            loss, _ = t.batch_loss({k: v[i * per:(i + 1) * per] for k, v in full.items()}, StepState(10, 50))
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    device = torch.device(a.device)
    data = faces_split(n=a.rows, dim=a.dim).to(device)
    s1 = make(Stage1Task, [resolve_config("stage1")], data)
    s1.module.to(device)
    presets = ["full", "cvar", "ldam", "minimal", "none"]
    cfgs = [resolve_config("stage2", presets[i % 5], sets=[f"training.seed={i // 5}"]) for i in range(a.runs)]

    def build(group):
        t = Stage2Task(group, device)
        t.data, t.inputs = {"train": data}, {"stage1": s1}
        t.spec = t.make_spec()
        t.module = t.build(t.spec).to(device)
        return t

    stacked = steps([build(cfgs)], data, a.runs, a.batch, a.steps, device)
    sequential = steps([build([c]) for c in cfgs], data, a.runs, a.batch, a.steps, device)
    print(f"device {device}, {a.runs} Stage-2 runs (5 presets x {a.runs // 5} seeds), batch {a.batch}, dim {a.dim}")
    print(f"stacked: {stacked:.3f} s/step for all runs; sequential: {sequential:.3f} s/step "
          f"({sequential / stacked:.2f}x)")


if __name__ == "__main__":
    main()
