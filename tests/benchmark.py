"""Benchmark: maml.py's meta-step against its peers, side by side in one process.

Not collected by pytest (its name does not start with test_). For each setting × order × algorithm
it times, interleaved round by round after a warm-up, on the same initial weights and the same
batches, each with its own Adam (β = 1e-3) on its own copy of the weights:
    ours      maml.meta_step (inner_loop=maml.adapt, or anil.adapt for ANIL), the preset's task_chunk
    ref-loop  tests/reference.py: torch's layers on one task at a time, autograd.grad inner loop
    higher    higher.innerloop_ctx on an nn.Module copy of the network, one task at a time
              (only when `import higher` works; `pip install higher`)
    l2l       learn2learn's MAML(model).clone()/adapt(), one task at a time (only when importable)
The peak memory of each is measured in a fresh subprocess of its own (--one ...), and the
episode sampler's throughput at the end.

    python tests/benchmark.py                          # everything, about 10-15 min on 1 thread
    python tests/benchmark.py --settings A B --rounds 5 --no-memory
    python tests/benchmark.py --check                  # float64: every peer's meta-gradient
    python tests/benchmark.py --profile --settings C D # where the time goes, by kernel family
    python tests/benchmark.py --device cuda --out bench.json

Settings (MAML §5.1, App. A.1): A sinusoid (T=25, K=Q=10, 1 step, α=0.01), B Omniglot 5-way
1-shot (T=32, Q=1, 1 step, α=0.4), C Omniglot 20-way 1-shot (T=16, Q=1, 5 steps, α=0.1),
D MiniImageNet 5-way 1-shot (T=4, Q=15, 5 steps, α=0.01); images are uniform noise.

Columns: "<impl> ms" is the median milliseconds per meta-iteration over the timed rounds;
"ours÷<peer>" is the median over rounds of (ours' time ÷ the peer's time in the same round), so
a load change between rounds cancels (STYLE.md rule 20); "mem rise" is the peak memory above
the subprocess's memory after building weights and batches (resident set size on the CPU, its
peak first reset to the current size so that an import's transient does not hide the rise;
torch.cuda.max_memory_allocated on CUDA), in MiB, over 2 meta-steps; on the CPU it includes a
floor of about 8 MiB that every implementation pays on its first step (libraries' code and
workspaces), which is most of the rise on A. --check prints max |g − g_ref| / max |g_ref|
over all parameters, float64, at a tiny size of each setting; all must be <= 1e-10.
"""

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import anil  # noqa: E402
import data  # noqa: E402
import maml  # noqa: E402
import reference  # noqa: E402

try:
    import higher
except ImportError:
    higher = None
try:
    import learn2learn as l2l
except Exception:          # not installed, or it fails to build / import
    l2l = None

SETTINGS = {
    "A": dict(name="sinusoid", preset=("sinusoid", 5, 10), T=25, shots=10, query=10, steps=1, inner_lr=0.01,
              rounds=100, warmup=3),
    "B": dict(name="omniglot-5w1s", preset=("omniglot", 5, 1), T=32, ways=5, shots=1, query=1, steps=1,
              inner_lr=0.4, channels=1, size=28, hidden=64, max_pool=False, rounds=20, warmup=2),
    "C": dict(name="omniglot-20w1s", preset=("omniglot", 20, 1), T=16, ways=20, shots=1, query=1, steps=5,
              inner_lr=0.1, channels=1, size=28, hidden=64, max_pool=False, rounds=4, warmup=1),
    "D": dict(name="miniimagenet-5w1s", preset=("miniimagenet", 5, 1), T=4, ways=5, shots=1, query=15, steps=5,
              inner_lr=0.01, channels=3, size=84, hidden=32, max_pool=True, rounds=4, warmup=1),
}
ALIASES = {s["name"]: k for k, s in SETTINGS.items()}
TOL = 1e-10
LABEL = {"ours": "ours", "ref": "ref-loop", "higher": "higher", "l2l": "l2l"}


def available_impls():
    return ["ours", "ref"] + ["higher"] * (higher is not None) + ["l2l"] * (l2l is not None)


def is_image(s):
    return "ways" in s


def feature_dim(s):
    """Omniglot: stride-2 convs and the global average -> hidden. MiniImageNet: 2x2 max-pool
    after each block, flattened: 84 -> 42 -> 21 -> 10 -> 5, so 32·5·5 = 800."""
    if not s["max_pool"]:
        return s["hidden"]
    size = s["size"]
    for _ in range(4):
        size //= 2
    return s["hidden"] * size * size


def initial_params(s, seed=0):
    g = torch.Generator().manual_seed(seed)
    if not is_image(s):
        return maml.init_mlp([1, 40, 40, 1], g)
    return maml.init_convnet(s["channels"], s["hidden"], s["ways"], feature_dim(s), g)


def make_batch(s, g, device, dtype):
    """x_support (T, N·K, C, H, W), y_support (T, N·K), x_query, y_query, as maml.py's."""
    if not is_image(s):
        b = data.sinusoid_tasks(s["T"], s["shots"], s["query"], g)
        batch = b["x_support"], b["y_support"], b["x_query"], b["y_query"]
    else:
        n, shape = s["ways"], (s["channels"], s["size"], s["size"])
        x_s = torch.rand(s["T"], n * s["shots"], *shape, generator=g)
        x_q = torch.rand(s["T"], n * s["query"], *shape, generator=g)
        y_s = torch.arange(n).repeat_interleave(s["shots"]).expand(s["T"], -1).contiguous()
        y_q = torch.arange(n).repeat_interleave(s["query"]).expand(s["T"], -1).contiguous()
        batch = x_s, y_s, x_q, y_q
    return tuple(b.to(device, dtype) if b.is_floating_point() else b.to(device) for b in batch)


# ---------------------------------------------------------------------------------------------
# The implementations. Each is (tensors for the optimizer, step(batch, optimizer), grads()),
# grads() giving the meta-gradient in maml.py's dict layout.
# ---------------------------------------------------------------------------------------------

def our_problem(s, algo):
    if not is_image(s):
        forward, loss, metric = maml.mlp_forward, maml.mse_per_task, maml.mse_per_task
        body, keys, names = partial(anil.mlp_body, layers=3), ("fc3.w", "fc3.b"), ("fc1", "fc2", "head")
    else:
        forward = partial(maml.conv_forward, max_pool=s["max_pool"])
        loss, metric = maml.cross_entropy_per_task, maml.accuracy_per_task
        body, keys = partial(maml.conv_body, max_pool=s["max_pool"]), ("fc.w", "fc.b")
        names = ("conv1", "conv2", "conv3", "conv4", "head")
    if algo == "anil":
        forward = anil.Net(body, anil.linear_head(*keys), keys, names)
    return SimpleNamespace(forward=forward, loss=loss, metric=metric)


class GlobalMean(nn.Module):
    def forward(self, h):                                            # (B, C, H, W) -> (B, C)
        return h.mean(dim=(2, 3))


def module_net(init, s):
    """nn.Module copies of the initial weights: body, head, and [(key, param, transposed)]."""
    if not is_image(s):
        body = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU())
        head = nn.Linear(40, 1)
        linears = [body[0], body[2], head]
        named = [(f"fc{i}.{a}", getattr(m, b), a == "w")
                 for i, m in enumerate(linears, 1) for a, b in (("w", "weight"), ("b", "bias"))]
    else:
        blocks, named, c_in = [], [], s["channels"]
        for i in range(1, 5):
            conv = nn.Conv2d(c_in, s["hidden"], 3, stride=1 if s["max_pool"] else 2, padding=1, bias=False)
            bn = nn.BatchNorm2d(s["hidden"], track_running_stats=False)   # batch statistics, as ours
            blocks += [conv, bn, nn.ReLU()] + [nn.MaxPool2d(2)] * s["max_pool"]
            named += [(f"conv{i}.w", conv.weight, False), (f"bn{i}.w", bn.weight, False), (f"bn{i}.b", bn.bias, False)]
            c_in = s["hidden"]
        body = nn.Sequential(*blocks, nn.Flatten() if s["max_pool"] else GlobalMean())
        head = nn.Linear(feature_dim(s), s["ways"])
        named += [("fc.w", head.weight, True), ("fc.b", head.bias, False)]
    with torch.no_grad():
        for key, p, transposed in named:
            p.copy_(init[key].T if transposed else init[key])
    return body, head, named


def higher_step(body, model, inner_opt, batch, optimizer, s, first_order, anil_, loss_fn, callback=False):
    """higher.innerloop_ctx, one task at a time. Second order: track_higher_grads=True and the
    query loss's backward reaches θ through the unrolled SGD steps. First order: the way higher's
    maintainers give (facebookresearch/higher#63): track_higher_grads=False makes every fast weight
    a detached leaf, so the query loss's gradient w.r.t. the last fast weights, ∇θ' L(θ'), is
    added to θ's .grad by hand. callback=True is the other correct way (--check only): keep
    track_higher_grads=True and detach the inner gradients with a grad_callback (it builds the
    double-backward graph that it then ignores)."""
    x_s, y_s, x_q, y_q = batch
    tasks = x_s.shape[0]
    optimizer.zero_grad(set_to_none=True)
    track = not first_order or callback
    step_kw = {"grad_callback": lambda gs: [g.detach() for g in gs]} if first_order and callback else {}
    for t in range(tasks):
        xs, xq = (body(x_s[t]), body(x_q[t])) if anil_ else (x_s[t], x_q[t])   # ANIL: features once
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False,
                                  track_higher_grads=track) as (fmodel, diffopt):
            for _ in range(s["steps"]):
                diffopt.step(loss_fn(fmodel(xs), y_s[t]), **step_kw)
            query = loss_fn(fmodel(xq), y_q[t]) / tasks
            query.backward()
            if not track:
                for p, fast in zip(model.parameters(), fmodel.parameters()):
                    p.grad = fast.grad if p.grad is None else p.grad + fast.grad
    optimizer.step()


def l2l_step(body, learner_root, batch, optimizer, s, anil_, loss_fn):
    """learn2learn's MAML: clone() and adapt() each task (its examples' loop, loss divided by T)."""
    x_s, y_s, x_q, y_q = batch
    tasks = x_s.shape[0]
    optimizer.zero_grad(set_to_none=True)
    for t in range(tasks):
        xs, xq = (body(x_s[t]), body(x_q[t])) if anil_ else (x_s[t], x_q[t])
        learner = learner_root.clone()
        for _ in range(s["steps"]):
            learner.adapt(loss_fn(learner(xs), y_s[t]))
        (loss_fn(learner(xq), y_q[t]) / tasks).backward()
    optimizer.step()


def make_impl(impl, s, order, algo, init, device, dtype, task_chunk=None):
    first_order, anil_ = order == "first", algo == "anil"
    if impl in ("ours", "ref"):
        params = {k: v.to(device, dtype).clone().requires_grad_() for k, v in init.items()}
        if impl == "ours":
            chunk = task_chunk or maml.paper_settings(*s["preset"])["task_chunk"]
            cfg = SimpleNamespace(inner_steps=s["steps"], inner_lr=s["inner_lr"], first_order=first_order,
                                  task_chunk=chunk, clip_grad=None)
            problem, adapt = our_problem(s, algo), (anil.adapt if anil_ else maml.adapt)
            step = lambda b, opt: maml.meta_step(params, opt, problem, b, cfg, inner_loop=adapt)  # noqa: E731
        else:
            kind = "conv" if is_image(s) else "mlp"
            step = lambda b, opt: reference.meta_step(params, opt, b, kind, s["steps"], s["inner_lr"],  # noqa: E731
                                                      first_order, anil_, s.get("max_pool", False))
        return list(params.values()), step, lambda: {k: v.grad for k, v in params.items()}
    body, head, named = module_net(init, s)
    body.to(device, dtype), head.to(device, dtype)
    loss_fn = F.cross_entropy if is_image(s) else F.mse_loss
    model = head if anil_ else nn.Sequential(body, head)                      # what the inner loop adapts
    tensors = list(body.parameters()) + list(head.parameters())
    if impl in ("higher", "higher-gc"):
        inner_opt = torch.optim.SGD(model.parameters(), lr=s["inner_lr"])
        step = partial(higher_step, body, model, inner_opt, s=s, first_order=first_order, anil_=anil_,
                       loss_fn=loss_fn, callback=impl == "higher-gc")
    else:
        root = l2l.algorithms.MAML(model, lr=s["inner_lr"], first_order=first_order)
        step = partial(l2l_step, body, root, s=s, anil_=anil_, loss_fn=loss_fn)
    grads = lambda: {k: p.grad.T if tr else p.grad for k, p, tr in named}   # noqa: E731
    return tensors, step, grads


class NoStep:
    """An optimizer that clears the gradients and leaves θ as it is (for --check)."""
    def __init__(self, tensors):
        self.tensors = tensors

    def zero_grad(self, set_to_none=True):
        for p in self.tensors:
            p.grad = None

    def step(self):
        pass


# ---------------------------------------------------------------------------------------------
# --check, timing, memory, the sampler
# ---------------------------------------------------------------------------------------------

def relative_difference(got, want):
    """max |got − want| over every parameter, relative to max |want|."""
    return max((got[k] - want[k]).abs().max().item() for k in want) / max(v.abs().max().item() for v in want.values())


def check(settings, orders, algorithms, task_chunk):
    """Every peer's meta-gradient against the reference loop's, float64, tiny sizes."""
    impls = ["ours"] + ["higher", "higher-gc"] * (higher is not None) + ["l2l"] * (l2l is not None)
    print("max |g - g_ref| / max |g_ref|, float64:", "  ".join(f"{i:>10}" for i in impls),
          "  (other order: g_ref of the other order, which must differ)")
    worst = 0.0
    for key in settings:
        s = dict(SETTINGS[key], T=3, hidden=8, size=28 if not SETTINGS[key].get("max_pool") else 32)
        s["query"] = min(s["query"], 2) if is_image(s) else s["query"]
        init = {k: v.double() for k, v in initial_params(s).items()}
        batch = make_batch(s, torch.Generator().manual_seed(1), "cpu", torch.float64)
        for order in orders:
            for algo in algorithms:
                want, other = (reference.meta_gradient(init, batch, "conv" if is_image(s) else "mlp", s["steps"],
                                                       s["inner_lr"], fo, algo == "anil", s.get("max_pool", False))
                               for fo in (order == "first", order != "first"))
                row = []
                for impl in impls:
                    tensors, step, grads = make_impl(impl, s, order, algo, init, "cpu", torch.float64, task_chunk)
                    step(batch, NoStep(tensors))
                    row.append(relative_difference(grads(), want))
                worst = max([worst] + [r if np.isfinite(r) else np.inf for r in row])
                print(f"  {key} {s['name']:<18} {order:<6} {algo:<5}", "  ".join(f"{r:10.1e}" for r in row),
                      f"  (other order: {relative_difference(other, want):.1e})")
    print(f"worst {worst:.1e}: " + ("all agree (<= 1e-10)" if worst <= TOL else "DISAGREE (> 1e-10)"))
    return worst <= TOL


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_cell(key, order, algo, impls, rounds, warmup, device, task_chunk):
    """Median ms of each implementation, and the median per-round ratio ours ÷ peer."""
    s = SETTINGS[key]
    init = initial_params(s)
    g = torch.Generator().manual_seed(1)
    batches = [make_batch(s, g, device, torch.float32) for _ in range(3)]
    runners = {}
    for impl in impls:
        tensors, step, _ = make_impl(impl, s, order, algo, init, device, torch.float32, task_chunk)
        runners[impl] = (step, torch.optim.Adam(tensors, lr=1e-3))
    times = {impl: [] for impl in impls}
    for r in range(warmup + rounds):
        for impl in impls[r % len(impls):] + impls[:r % len(impls)]:    # rotate who goes first
            step, opt = runners[impl]
            sync(device)
            start = time.perf_counter()
            step(batches[r % len(batches)], opt)
            sync(device)
            if r >= warmup:
                times[impl].append(1000 * (time.perf_counter() - start))
    ms = {impl: float(np.median(t)) for impl, t in times.items()}
    ratio = {p: float(np.median(np.array(times["ours"]) / np.array(times[p]))) for p in impls if p != "ours"}
    return {"ms": ms, "ratio": ratio, "times_ms": times}


def kernel_family(op):
    for family, word in (("conv", "conv"), ("batchnorm", "batch_norm"), ("maxpool", "max_pool")):
        if word in op:
            return family
    return "rest"          # elementwise ops (ReLU, BatchNorm's double backward), reductions, copies, Adam


def profile_cell(key, order, algo, impls, device, task_chunk, rounds=4):
    """--profile: the operators' own time (ms) and calls of one meta-step of each implementation,
    summed by kernel family, averaged over `rounds` profiled rounds after two warm-up rounds. Who
    goes first alternates between rounds (so `rounds` is even), as in time_cell: in one process, whichever runs first after a
    new allocation pattern can be 1.5x slower in its memory-bound kernels. Batching pays by making
    fewer, larger calls: where a family takes ours as long as the loop with fewer calls, its kernels
    are bound by their work, not by the calls."""
    from torch.profiler import ProfilerActivity, profile
    s = SETTINGS[key]
    batch = make_batch(s, torch.Generator().manual_seed(1), device, torch.float32)
    runners = {}
    for impl in impls:
        tensors, step, _ = make_impl(impl, s, order, algo, initial_params(s), device, torch.float32, task_chunk)
        runners[impl] = (step, torch.optim.Adam(tensors, lr=1e-3))
    for _ in range(2):
        for step, opt in runners.values():
            step(batch, opt)
    out = {impl: {"ms": {}, "calls": {}} for impl in impls}
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (device.type == "cuda")
    for r in range(rounds):
        for impl in impls[r % len(impls):] + impls[:r % len(impls)]:
            step, opt = runners[impl]
            with profile(activities=activities) as prof:
                step(batch, opt)
                sync(device)
            ms, calls = out[impl]["ms"], out[impl]["calls"]
            for e in prof.key_averages():
                f = kernel_family(e.key)
                own = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
                ms[f] = ms.get(f, 0.0) + own / 1e3 / rounds
                calls[f] = calls.get(f, 0) + e.count / rounds
    for impl in impls:
        out[impl]["total_ms"] = sum(out[impl]["ms"].values())
    return out


def measure_memory(key, order, algo, impl, device, task_chunk, steps=2):
    """In this (fresh) process: peak memory rise over the state after building weights and batches."""
    s = SETTINGS[key]
    init = initial_params(s)
    g = torch.Generator().manual_seed(1)
    batches = [make_batch(s, g, device, torch.float32) for _ in range(2)]
    tensors, step, _ = make_impl(impl, s, order, algo, init, device, torch.float32, task_chunk)
    opt = torch.optim.Adam(tensors, lr=1e-3)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base, _ = resident(reset_peak=True)
    for i in range(steps):
        step(batches[i % 2], opt)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        _, peak = resident()
    return (peak - base) / 2**20


def resident(reset_peak=False):
    """(current, peak) resident set size in bytes. reset_peak first lowers the peak to the current
    size (Linux's /proc/self/clear_refs), so that a transient of the imports or the setup is not
    the peak that the steps are measured against. Elsewhere: ru_maxrss for both."""
    try:
        if reset_peak:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/status") as f:
            status = f.read()
        return tuple(int(re.search(rf"^{k}:\s+(\d+) kB", status, re.M).group(1)) * 1024 for k in ("VmRSS", "VmHWM"))
    except (OSError, AttributeError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return peak, peak


def memory_subprocess(key, order, algo, impl, args):
    cmd = [sys.executable, __file__, "--one", key, order, algo, impl, "--device", args.device,
           "--threads", str(args.threads)] + (["--task-chunk", str(args.task_chunk)] if args.task_chunk else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:                       # reported, and the run goes on without it
        print(f"memory run {key} {order} {algo} {impl} failed: {out.stderr.strip()[-500:]}")
        return float("nan")
    return float(out.stdout.strip().splitlines()[-1])


def sampler_throughput():
    """Omniglot 20-way 1-shot episodes per second on a split the size of the standard training
    split (1100 characters x 4 rotations, 20 images of 28x28), batches of 1 and 16 tasks."""
    rng = np.random.default_rng(0)
    per_class = [rng.integers(0, 256, (20, 1, 28, 28), dtype=np.uint8) for _ in range(4400)]
    sampler = data.EpisodeSampler(data.ClassImages.from_lists(per_class, [str(i) for i in range(4400)]),
                                  ways=20, shots=1, query=1)
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


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def targets(cells):
    """The issue's targets, each with the cells that miss it."""
    out = {}
    for name, keys, limit in (("ours <= 0.85x ref-loop and higher", "ABCD", 0.85),
                               ("ours <= 0.6x ref-loop and higher on A and B", "AB", 0.6)):
        miss = [f"{c['setting']} {c['order']} {c['algo']} vs {LABEL[p]}: {r:.3f}" for c in cells if c["setting"] in keys
                for p, r in c["ratio"].items() if p in ("ref", "higher") and r > limit]
        out[name] = miss
    if all(c.get("mem_mib") for c in cells):
        out["memory rise ours <= 1.5x ref-loop's"] = [
            f"{c['setting']} {c['order']} {c['algo']}: {c['mem_mib']['ours']:.0f} vs {c['mem_mib']['ref']:.0f} MiB"
            for c in cells if c["mem_mib"]["ours"] > 1.5 * max(c["mem_mib"]["ref"], 1.0)]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS),
                   help="A B C D, or sinusoid omniglot-5w1s omniglot-20w1s miniimagenet-5w1s")
    p.add_argument("--orders", nargs="+", choices=("second", "first"), default=["second", "first"])
    p.add_argument("--algorithms", nargs="+", choices=("maml", "anil"), default=["maml", "anil"])
    p.add_argument("--rounds", type=int, help="timed rounds per cell (default: 100 A, 20 B, 4 C, 4 D; --profile: 4)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default: 3 A, 2 B, 1 C, 1 D)")
    p.add_argument("--task-chunk", type=int, help="override ours' task_chunk (default: maml.paper_settings')")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads, here and in the subprocesses")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--check", action="store_true", help="compare every peer's meta-gradient with the reference loop's")
    p.add_argument("--profile", action="store_true", help="instead of timing: where one meta-step of ours and of "
                   "the loop spends its time, by kernel family (convolution, BatchNorm, max-pool, the rest)")
    p.add_argument("--out", help="write every number to this JSON file")
    p.add_argument("--one", nargs=4, metavar=("SETTING", "ORDER", "ALGO", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    keep = data.keep_freed_memory()                        # glibc's malloc as the scripts set it
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.one:
        print(measure_memory(*args.one, device, args.task_chunk))
        return
    settings = [ALIASES.get(k, k) for k in args.settings]
    for k in settings:
        if k not in SETTINGS:
            p.error(f"unknown setting {k!r}: use {' '.join(SETTINGS)} or {' '.join(ALIASES)}")
    impls = available_impls()
    header = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
              "cpu": cpu_model(), "python": platform.python_version(), "peers": impls[1:],
              "keep_freed_memory": keep}
    print(" ".join(f"{k}={v}" for k, v in header.items()))
    if higher is None:
        print("higher: not importable (pip install higher), skipped")
    if l2l is None:
        print("learn2learn: not importable (it does not build from the package index on Python 3.11)")
    if args.check:
        raise SystemExit(0 if check(settings, args.orders, args.algorithms, args.task_chunk) else 1)

    if args.profile:
        cells = []
        print("own time of each kernel family per meta-step, ms (calls), mean of the profiled rounds; ours÷loop of each")
        for key in settings:
            for order in args.orders:
                for algo in args.algorithms:
                    prof = profile_cell(key, order, algo, ["ours", "ref"], device, args.task_chunk, args.rounds or 4)
                    cells.append({"setting": key, "order": order, "algo": algo, "profile": prof})
                    families = [f for f in ("conv", "batchnorm", "maxpool", "rest") if prof["ref"]["ms"].get(f)]
                    for impl in ("ours", "ref"):
                        r = prof[impl]
                        print(f"{key} {order:<6} {algo:<4} {LABEL[impl]:<8} total {r['total_ms']:7.0f}  " + "  ".join(
                            f"{f} {r['ms'].get(f, 0):6.0f} ({r['calls'].get(f, 0):6.0f})" for f in families))
                    print(f"{key} {order:<6} {algo:<4} ours÷loop total {prof['ours']['total_ms'] / prof['ref']['total_ms']:.2f}  "
                          + "  ".join(f"{f} {prof['ours']['ms'].get(f, 0) / prof['ref']['ms'][f]:.2f}" for f in families),
                          flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"header": header, "args": vars(args), "cells": cells}, f, indent=1)
        return

    cells = []
    for key in settings:
        s = SETTINGS[key]
        rounds, warmup = args.rounds or s["rounds"], s["warmup"] if args.warmup is None else args.warmup
        for order in args.orders:
            for algo in args.algorithms:
                cell = {"setting": key, "name": s["name"], "order": order, "algo": algo, "rounds": rounds,
                        "task_chunk": args.task_chunk or maml.paper_settings(*s["preset"])["task_chunk"],
                        **time_cell(key, order, algo, impls, rounds, warmup, device, args.task_chunk)}
                if not args.no_memory:
                    cell["mem_mib"] = {impl: memory_subprocess(key, order, algo, impl, args) for impl in impls}
                cells.append(cell)
                line = "  ".join(f"{LABEL[i]} {cell['ms'][i]:.1f} ms" for i in impls)
                line += "  " + "  ".join(f"ours÷{LABEL[q]} {r:.2f}" for q, r in cell["ratio"].items())
                if "mem_mib" in cell:
                    line += "  mem rise " + " / ".join(f"{cell['mem_mib'][i]:.1f}" for i in impls) + " MiB"
                print(f"{key} {s['name']:<18} {order:<6} {algo:<4} chunk {cell['task_chunk']:<2}  {line}", flush=True)
    samp = sampler_throughput()
    print("sampler, Omniglot 20-way 1-shot, 4400 classes: "
          + ", ".join(f"{k}={v:.0f}" for k, v in samp.items()))

    peers = impls[1:]
    print("\n| setting | order | algo | " + " | ".join(f"{LABEL[i]} ms" for i in impls) + " | "
          + " | ".join(f"ours÷{LABEL[q]}" for q in peers) + " | mem rise " + " / ".join(LABEL[i] for i in impls) + " MiB |")
    print("|" + "---|" * (3 + len(impls) + len(peers) + 1))
    for c in cells:
        mem = " / ".join(f"{c['mem_mib'][i]:.1f}" for i in impls) if "mem_mib" in c else "-"
        print(f"| {c['setting']} {c['name']} | {c['order']} | {c['algo']} | "
              + " | ".join(f"{c['ms'][i]:.1f}" for i in impls) + " | "
              + " | ".join(f"{c['ratio'][q]:.2f}" for q in peers) + f" | {mem} |")
    goals = targets(cells)
    for name, miss in goals.items():
        print(f"target {name}: " + ("holds" if not miss else "MISSED: " + "; ".join(miss)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"header": header, "args": vars(args), "cells": cells, "sampler": samp,
                       "targets": goals}, f, indent=1)


if __name__ == "__main__":
    main()
