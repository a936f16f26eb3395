"""Benchmark of torchrun: 1 process × 2 threads against 2 processes × 1 thread (not collected by pytest).

Prints ms per second-order MAML meta-iteration on Omniglot 5-way 1-shot (meta-batch 32, 1 step)
and MiniImageNet 5-way 1-shot (meta-batch 4, 5 steps), random images, the same batches for both.
The 2-process run splits each meta-batch between the ranks and all-reduces the meta-gradient, as
`torchrun --standalone --nproc_per_node=2 maml.py ...` does.

    python tests/benchmark_distributed.py --out results/benchmark_distributed_cpu.json   # about 3 minutes, 2 cores
    python tests/benchmark_distributed.py --processes 4 --threads-single 4
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import maml  # noqa: E402

SETTINGS = {
    "omniglot-5w1s": dict(dataset="omniglot", ways=5, shots=1, query=1, size=28, channels=1, hidden=64),
    "miniimagenet-5w1s": dict(dataset="miniimagenet", ways=5, shots=1, query=15, size=84, channels=3, hidden=32),
}


def worker(name, reps):
    """One rank (or the single process): time maml.meta_step on this rank's slice of each meta-batch."""
    s = SETTINGS[name]
    paper = maml.paper_settings(s["dataset"], s["ways"], s["shots"])
    cfg = SimpleNamespace(meta_batch_size=paper["meta_batch_size"], device="cpu", save=None, out=None, plot=None,
                          inner_steps=paper["inner_steps"], inner_lr=paper["inner_lr"], first_order=False,
                          task_chunk=paper["task_chunk"], clip_grad=paper.get("clip_grad"))
    data.setup_distributed(cfg, "benchmark")
    g = torch.Generator().manual_seed(0)
    max_pool = s["dataset"] != "omniglot"
    params = maml.init_convnet(s["channels"], s["hidden"], s["ways"],
                               maml.conv_feature_dim(s["size"], s["hidden"], max_pool), g)
    params = {k: v.requires_grad_() for k, v in params.items()}
    problem = SimpleNamespace(forward=lambda p, x: maml.conv_forward(p, x, max_pool),
                              loss=maml.cross_entropy_per_task, metric=maml.accuracy_per_task)
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    T, n, shape = cfg.meta_batch_size, s["ways"], (s["channels"], s["size"], s["size"])
    batches = []
    for _ in range(2):
        y_s = torch.arange(n).repeat_interleave(s["shots"]).expand(T, -1)
        y_q = torch.arange(n).repeat_interleave(s["query"]).expand(T, -1)
        batches.append((torch.rand(T, n * s["shots"], *shape, generator=g), y_s,
                        torch.rand(T, n * s["query"], *shape, generator=g), y_q))
    times = []
    for i in range(reps + 2):      # 2 warm-up iterations
        start = time.perf_counter()
        maml.meta_step(params, optimizer, problem, data.rank_tasks(batches[i % 2]), cfg)
        times.append(time.perf_counter() - start)
    if data.RANK == 0:
        sys.__stdout__.write(json.dumps({"ms": 1000 * float(np.median(times[2:]))}) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--processes", type=int, default=2, help="ranks of the torchrun side, 1 thread each")
    p.add_argument("--threads-single", type=int, default=2, help="threads of the single process")
    p.add_argument("--reps", type=int, default=10, help="timed meta-iterations per measurement")
    p.add_argument("--out", default=None, help="write the table's numbers to this JSON file (the README's ledger)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.reps)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown CPU") if os.path.exists("/proc/cpuinfo") else "unknown CPU"
    print(f"torch {torch.__version__}, {os.cpu_count()} cores ({cpu}), float32, second-order MAML, "
          f"median of {args.reps} meta-iterations after 2 warm-up")
    print(f"| setting | 1 process × {args.threads_single} threads, ms | {args.processes} processes × 1 thread, ms "
          f"| speed-up |")
    print("|---|---|---|---|")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    rows = []
    for name in args.settings:
        single = [sys.executable, __file__, "--worker", name, "--reps", str(args.reps)]
        multi = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.processes}",
                 __file__, "--worker", name, "--reps", str(args.reps)]
        ms = []
        for command, threads in ((single, args.threads_single), (multi, 1)):
            out = subprocess.run(command, capture_output=True, text=True, env=env | {"OMP_NUM_THREADS": str(threads)})
            if out.returncode != 0:
                raise SystemExit(out.stderr[-3000:])
            ms.append(json.loads(out.stdout.strip().splitlines()[-1])["ms"])
        print(f"| {name} | {ms[0]:.0f} | {ms[1]:.0f} | {ms[0] / ms[1]:.2f}× |")
        rows.append({"setting": name, "single_ms": ms[0], "multi_ms": ms[1], "speedup": ms[0] / ms[1]})
    if args.out:
        header = {"torch": torch.__version__, "cores": os.cpu_count(), "cpu": cpu, "processes": args.processes,
                  "threads_single": args.threads_single, "reps": args.reps}
        Path(args.out).write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
