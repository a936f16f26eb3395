"""Benchmark of maml.py and data.py (not collected by pytest: its name does not start with test_).

Prints, for the four paper settings, the milliseconds per meta-iteration and the peak memory of
second-order MAML and first-order MAML, next to a per-task loop with torch's own F.conv2d /
F.batch_norm layers, which is the computation learn2learn's MAML.clone()/adapt() runs (without
its module-cloning overhead, so the loop is a lower bound on learn2learn's time). Then the
episode sampler's throughput on one core.

    python tests/benchmark.py                 # everything, about 3 minutes on 2 CPU cores
    python tests/benchmark.py --settings sinusoid --device cuda

Each measurement runs in a fresh subprocess, so that the peak memory (resident set size on the
CPU, max_memory_allocated on CUDA) belongs to that measurement alone. The subprocesses set glibc's
malloc as the scripts do (maml.keep_freed_memory()), our code and the per-task loop alike;
--malloc-default leaves it alone, as it was when the learn2learn times were taken.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import maml  # noqa: E402

# The paper settings (MAML App. A.1, §5.1). The learn2learn times were measured on this
# project's 2-core machine with MAML.clone()/adapt() on identical settings (issue #3).
SETTINGS = {
    "sinusoid": dict(T=25, shots=10, query=10, steps=1, l2l_ms=38, preset="sinusoid"),
    "omniglot-5w1s": dict(T=32, ways=5, shots=1, query=1, steps=1, size=28, channels=1, hidden=64,
                          max_pool=False, l2l_ms=531, preset="omniglot-5way"),
    "omniglot-20w1s": dict(T=16, ways=20, shots=1, query=1, steps=5, size=28, channels=1, hidden=64,
                           max_pool=False, l2l_ms=2610, preset="omniglot-20way"),
    "miniimagenet-5w1s": dict(T=4, ways=5, shots=1, query=15, steps=5, size=84, channels=3, hidden=32,
                              max_pool=True, l2l_ms=None, preset="miniimagenet"),
}


def make_batch(s, device, g):
    if "ways" not in s:
        b = data.sinusoid_tasks(s["T"], s["shots"], s["query"], g, device=device)
        return b["x_support"], b["y_support"], b["x_query"], b["y_query"]
    n, shape = s["ways"], (s["channels"], s["size"], s["size"])
    x_s = torch.rand(s["T"], n * s["shots"], *shape, generator=g).to(device)
    x_q = torch.rand(s["T"], n * s["query"], *shape, generator=g).to(device)
    y_s = torch.arange(n).repeat_interleave(s["shots"]).expand(s["T"], -1).to(device)
    y_q = torch.arange(n).repeat_interleave(s["query"]).expand(s["T"], -1).to(device)
    return x_s, y_s, x_q, y_q


def make_problem(s, g):
    if "ways" not in s:
        return maml.Problem(maml.init_mlp([1, 40, 40, 1], g), maml.mlp_forward, maml.mse_per_task,
                            maml.mse_per_task, "mse", None)
    params = maml.init_convnet(s["channels"], s["hidden"], s["ways"],
                               maml.conv_feature_dim(s["size"], s["hidden"], s["max_pool"]), g)
    return maml.Problem(params, lambda p, x: maml.conv_forward(p, x, s["max_pool"]),
                        maml.cross_entropy_per_task, maml.accuracy_per_task, "acc", None)


def loop_forward(p, x, s):
    """One task, torch's layers, as an nn.Module network would run it (what learn2learn clones)."""
    if "ways" not in s:
        h = F.relu(F.linear(x, p["fc1.w"].T, p["fc1.b"]))
        h = F.relu(F.linear(h, p["fc2.w"].T, p["fc2.b"]))
        return F.linear(h, p["fc3.w"].T, p["fc3.b"])
    h = x
    for i in range(1, 5):
        h = F.conv2d(h, p[f"conv{i}.w"], stride=1 if s["max_pool"] else 2, padding=1)
        h = F.relu(F.batch_norm(h, None, None, p[f"bn{i}.w"], p[f"bn{i}.b"], training=True))
        if s["max_pool"]:
            h = F.max_pool2d(h, 2)
    h = h.flatten(1) if s["max_pool"] else h.mean(dim=(2, 3))
    return F.linear(h, p["fc.w"].T, p["fc.b"])


def loop_meta_step(params, optimizer, batch, s, inner_lr, first_order):
    """The per-task loop: adapt each task with autograd.grad, accumulate its query loss."""
    x_s, y_s, x_q, y_q = batch
    T = x_s.shape[0]
    loss_fn = F.mse_loss if "ways" not in s else F.cross_entropy
    optimizer.zero_grad(set_to_none=True)
    for t in range(T):
        fast = params
        for _ in range(s["steps"]):
            loss = loss_fn(loop_forward(fast, x_s[t], s), y_s[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {k: w - inner_lr * g for (k, w), g in zip(fast.items(), grads)}
        (loss_fn(loop_forward(fast, x_q[t], s), y_q[t]) / T).backward()
    optimizer.step()


def measure(name, method, device, reps):
    """ms per meta-iteration of one setting and method, in this (fresh) process."""
    s = SETTINGS[name]
    g = torch.Generator().manual_seed(0)
    problem = make_problem(s, g)
    params = {k: v.to(device).requires_grad_() for k, v in problem.params.items()}
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    # the preset's task_chunk: how many tasks maml.py batches together in this setting
    cfg = SimpleNamespace(inner_steps=s["steps"], inner_lr=0.01, first_order=method.endswith("fomaml"),
                          task_chunk=maml.CHUNKS[s["preset"]]["task_chunk"])
    batches = [make_batch(s, device, g) for _ in range(3)]
    if method.startswith("loop"):
        def step(b):
            loop_meta_step(params, optimizer, b, s, cfg.inner_lr, cfg.first_order)
    else:
        def step(b):
            maml.meta_step(params, optimizer, problem, b, cfg)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(2):  # warm-up
        step(batches[i % 3])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(reps):
        start = time.perf_counter()
        step(batches[i % 3])
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"ms": 1000 * float(np.median(times)), "peak_mib": peak,
            "rss_before_mib": base_rss / 1024, "reps": reps}


def sampler_throughput():
    """Omniglot 20-way 1-shot episodes per second on one core, on a split the size of the
    standard training split (1100 characters x 4 rotations, 20 images of 28x28)."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    per_class = [rng.integers(0, 256, (20, 1, 28, 28), dtype=np.uint8) for _ in range(4400)]
    split = data.ClassImages.from_lists(per_class, [str(i) for i in range(4400)])
    sampler = data.EpisodeSampler(split, ways=20, shots=1, query=1)
    g = torch.Generator().manual_seed(0)
    out = {}
    for tasks in (1, 16):
        sampler.sample(tasks, g)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < 2.0:
            sampler.sample(tasks, g)
            n += tasks
        out[f"episodes_per_s_batch{tasks}"] = n / (time.perf_counter() - start)
    return out


REPS = {"sinusoid": 200, "omniglot-5w1s": 8, "omniglot-20w1s": 3, "miniimagenet-5w1s": 5}
METHODS = ("maml", "fomaml", "loop-maml", "loop-fomaml")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps-scale", type=float, default=1.0, help="multiply the repetitions")
    p.add_argument("--one", nargs=2, metavar=("SETTING", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--malloc-default", action="store_true",
                   help="leave glibc's malloc settings alone (the scripts call maml.keep_freed_memory(); "
                        "the learn2learn times were taken without it)")
    p.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.one:
        if not args.malloc_default:
            maml.keep_freed_memory()
        name, method = args.one
        reps = max(1, int(REPS[name] * args.reps_scale))
        print(json.dumps(measure(name, method, device, reps)))
        return

    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"keep_freed_memory={not args.malloc_default}")
    results = {}
    mem = "peak MiB (CUDA allocated)" if device.type == "cuda" else "peak RSS MiB (+ over the process before the first step)"
    print(f"{'setting':<19} {'method':<12} {'ms/iter':>9}   {mem}")
    for name in args.settings:
        for method in METHODS:
            out = subprocess.run([sys.executable, __file__, "--one", name, method, "--device", args.device,
                                  "--reps-scale", str(args.reps_scale)] + ["--malloc-default"] * args.malloc_default,
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(out.stderr)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[(name, method)] = r
            extra = "" if device.type == "cuda" else f" (+{r['peak_mib'] - r['rss_before_mib']:.0f})"
            print(f"{name:<19} {method:<12} {r['ms']:9.1f}   {r['peak_mib']:.0f}{extra}")
        s = SETTINGS[name]
        so, fo = results[(name, "maml")]["ms"], results[(name, "fomaml")]["ms"]
        loop = results[(name, "loop-maml")]["ms"]
        line = f"  -> first-order speed-up {so / fo:.2f}x (target >= 1.33); MAML / per-task loop = {so / loop:.2f}"
        if s["l2l_ms"]:
            line += f"; MAML / learn2learn's {s['l2l_ms']} ms = {so / s['l2l_ms']:.2f} (target <= 0.85)"
        print(line)
    samp = sampler_throughput()
    print("sampler, Omniglot 20-way 1-shot, 1 core: " + ", ".join(f"{k}={v:.0f}" for k, v in samp.items())
          + " (target >= 2000 episodes/s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(device), "threads": torch.get_num_threads(),
                       "keep_freed_memory": not args.malloc_default,
                       "steps": {f"{n}/{m}": r for (n, m), r in results.items()}, "sampler": samp}, f, indent=1)


if __name__ == "__main__":
    main()
