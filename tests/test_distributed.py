"""torchrun (data.setup_distributed): 2 processes on the CPU (gloo) reach the parameters of 1 process.

Every rank draws the same meta-batch and adapts its own slice of the tasks; the means over tasks are
averaged across ranks, weighted by tasks per rank. So after a few meta-iterations θ must equal the
single-process θ up to float summation order, for an even and an uneven split of the tasks. Each
rank runs in its own working folder with relative --save/--out paths, so that a file written by any
rank but 0 would show."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

FAST = ["--iterations", "3", "--val-tasks", "2", "--test-tasks", "2", "--eval-steps", "1", "--device", "cpu"]
FILES = ["--save", "ckpt.pt", "--out", "out.json"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    return env | {"OMP_NUM_THREADS": "1"}


def run_one(script, argv, folder):
    folder.mkdir()
    out = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=folder, env=single_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return folder


def run_ranks(script, argv, folder, world=2):
    """What torchrun does for --standalone: one process per rank with RANK, LOCAL_RANK, WORLD_SIZE and
    the rendezvous address in its environment."""
    port, procs = free_port(), []
    for rank in range(world):
        (folder / f"rank{rank}").mkdir(parents=True)
        env = single_env() | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / script), *argv], cwd=folder / f"rank{rank}",
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    for rank in range(1, world):
        assert list((folder / f"rank{rank}").iterdir()) == [], "only rank 0 writes files"
        assert outs[rank][0] == "", "only rank 0 prints"
    assert "torchrun: 2 processes" in outs[0][0]
    return folder / "rank0"


def assert_same_params(a, b, keys=("params",)):
    sa, sb = (torch.load(d / "ckpt.pt", weights_only=True) for d in (a, b))
    assert sa["iteration"] == sb["iteration"]
    for key in keys:
        pa = sa[key] if key == "params" else {**sa[key]["m"], **{k + ".v": v for k, v in sa[key]["v"].items()}}
        pb = sb[key] if key == "params" else {**sb[key]["m"], **{k + ".v": v for k, v in sb[key]["v"].items()}}
        assert pa.keys() == pb.keys()
        for k in pa:
            torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=1e-6)


# float32 sums of the same tasks in another order differ in the last bits, and Adam's first steps
# (about ±β per element, whatever the gradient's size) turn that into up to ~1e-5 for an element whose
# gradient cancels across tasks: one process with --task-chunk 4 and with 1 differ by 5e-5 after 3
# iterations on the Omniglot case. So the Omniglot cases give each rank the chunks of the single
# process (--task-chunk 2): the ranks' sums are then its sums, and the weights 1/2 are exact. The
# uneven splits run on the sinusoid; the float64 test at the end checks the meta-gradient to 1e-12.
OMNIGLOT = ["--dataset", "omniglot", "--ways", "3", "--task-chunk", "2"]
CASES = {
    # (script, its arguments, checkpoint entries compared)
    "maml-sinusoid-uneven": ("maml.py", ["--meta-batch-size", "5", "--no-baseline"], ("params",)),
    "maml-omniglot-even": ("maml.py", OMNIGLOT + ["--meta-batch-size", "4"], ("params",)),
    "anil-sinusoid-uneven": ("anil.py", ["--meta-batch-size", "5"], ("params",)),
    "anil-omniglot-even": ("anil.py", OMNIGLOT + ["--meta-batch-size", "4"], ("params",)),
    "reptile-sinusoid-uneven": ("reptile.py", ["--meta-batch-size", "5"], ("params",)),
    "reptile-omniglot-uneven": ("reptile.py", OMNIGLOT[:4] + ["--meta-batch-size", "3", "--train-shots", "3",
                                                          "--inner-batch", "3", "--eval-inner-batch", "2"],
                                ("params", "inner_state")),
}


@pytest.mark.parametrize("case", CASES)
def test_two_processes_give_the_parameters_of_one(case, tmp_path, omniglot_dir):
    script, argv, keys = CASES[case]
    if "omniglot" in argv:
        argv = argv + ["--data-dir", str(omniglot_dir)]
    one = run_one(script, FAST + argv + FILES, tmp_path / "one")
    two = run_ranks(script, FAST + argv + FILES, tmp_path / "two")
    assert_same_params(one, two, keys)


def test_a_checkpoint_of_two_processes_resumes_in_one(tmp_path):
    """2 ranks train 2 iterations; 1 process resumes to 3: the same θ as 3 iterations in 1 process."""
    argv = ["--meta-batch-size", "5", "--no-baseline", "--val-tasks", "2", "--test-tasks", "2",
            "--eval-steps", "1", "--val-every", "1", "--device", "cpu"]
    one = run_one("maml.py", argv + ["--iterations", "3"] + FILES, tmp_path / "one")
    two = run_ranks("maml.py", argv + ["--iterations", "2"] + FILES, tmp_path / "two")
    out = subprocess.run([sys.executable, str(ROOT / "maml.py"), *argv, "--iterations", "3", "--resume", "ckpt.pt",
                          *FILES], cwd=two, env=single_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert_same_params(one, two)


def test_the_torchrun_command_of_the_readme(tmp_path):
    (tmp_path / "run").mkdir()
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "maml.py"), *FAST, "--meta-batch-size", "5", "--no-baseline", *FILES],
                         cwd=tmp_path / "run", env=single_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("meta-test") + out.stdout.count("Sinusoid regression") == 1   # printed once
    one = run_one("maml.py", FAST + ["--meta-batch-size", "5", "--no-baseline"] + FILES, tmp_path / "one")
    assert_same_params(one, tmp_path / "run")


def test_fewer_tasks_than_processes_is_a_clear_error(tmp_path):
    env = single_env() | {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    out = subprocess.run([sys.executable, str(ROOT / "maml.py"), *FAST, "--meta-batch-size", "1"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "--meta-batch-size 1 is smaller than the 2 processes" in out.stderr


@pytest.mark.parametrize("argv, message", [(["nil.py", "--dataset", "omniglot"], "nil.py does not run under torchrun"),
                                           (["maml.py", "--env", "navigation2d"], "TRPO's meta-step")])
def test_what_is_not_distributed_says_so(argv, message, tmp_path):
    env = single_env() | {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    out = subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and message in out.stderr


GRADIENT_PROBE = """
import sys, torch
from types import SimpleNamespace
sys.path.insert(0, {root!r})
import data, maml, anil
torch.set_default_dtype(torch.float64)
cfg = SimpleNamespace(meta_batch_size=5, device="cpu", save=None, out=None, plot=None, inner_steps=2,
                      inner_lr=0.3, first_order=False, task_chunk=2, clip_grad=None)
data.setup_distributed(cfg, "probe")
g = torch.Generator().manual_seed(0)
params = {{k: v.double().requires_grad_() for k, v in maml.init_convnet(1, 4, 3, 4, g).items()}}
x_s, x_q = torch.rand(5, 6, 1, 16, 16, generator=g), torch.rand(5, 3, 1, 16, 16, generator=g)
y_s, y_q = torch.arange(3).repeat(2).expand(5, -1), torch.arange(3).expand(5, -1)
forward = lambda p, x: maml.conv_forward(p, x, False)
for name, adapt in (("maml", maml.adapt), ("anil", anil.adapt)):
    net = anil.Net(lambda p, x: maml.conv_body(p, x, False), anil.linear_head("fc.w", "fc.b"), ("fc.w", "fc.b"),
                   ("conv1", "conv2", "conv3", "conv4", "head"))
    problem = SimpleNamespace(forward=net if name == "anil" else forward, loss=maml.cross_entropy_per_task,
                              metric=maml.accuracy_per_task)
    optimizer = torch.optim.SGD(params.values(), lr=0.0)
    loss, metric = maml.meta_step(params, optimizer, problem, data.rank_tasks((x_s, y_s, x_q, y_q)), cfg, adapt)
    if data.RANK == 0:
        torch.save({{"grads": {{k: p.grad for k, p in params.items()}}, "loss": loss, "metric": metric}},
                   sys.argv[1] + "-" + name)
"""


def test_the_meta_gradient_of_two_processes_is_that_of_one_in_float64(tmp_path):
    """5 tasks on 2 ranks (3 and 2, task_chunk 2): the all-reduced meta-gradient, loss and accuracy equal
    the single process's to 1e-12, for MAML and ANIL, second order."""
    probe = tmp_path / "probe.py"
    probe.write_text(GRADIENT_PROBE.format(root=str(ROOT)))
    one = subprocess.run([sys.executable, str(probe), str(tmp_path / "one")], env=single_env(),
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-2000:]
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(probe), str(tmp_path / "two")], stderr=subprocess.PIPE, text=True,
                              env=single_env() | {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()[-2000:]
    for name in ("maml", "anil"):
        a, b = (torch.load(tmp_path / f"{side}-{name}", weights_only=True) for side in ("one", "two"))
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)
        assert a["metric"] == pytest.approx(b["metric"], rel=1e-6)     # accuracies are float32 means
        for k in a["grads"]:
            torch.testing.assert_close(a["grads"][k], b["grads"][k], rtol=1e-12, atol=1e-14)
        assert max(v.abs().max().item() for v in a["grads"].values()) > 1e-3    # not a comparison of zeros


def test_a_checkpoint_of_one_process_resumes_on_two_ranks(tmp_path):
    """1 process trains 2 iterations; 2 ranks resume it to 3: the same θ as 3 iterations in 1 process."""
    argv = ["--meta-batch-size", "5", "--no-baseline", "--val-tasks", "2", "--test-tasks", "2",
            "--eval-steps", "1", "--val-every", "1", "--device", "cpu"]
    one = run_one("maml.py", argv + ["--iterations", "3"] + FILES, tmp_path / "one")
    first = run_one("maml.py", argv + ["--iterations", "2"] + FILES, tmp_path / "first")
    (tmp_path / "two").mkdir()
    (first / "ckpt.pt").rename(tmp_path / "two" / "start.pt")
    two = run_ranks("maml.py", argv + ["--iterations", "3", "--resume", "../start.pt"] + FILES, tmp_path / "two")
    assert_same_params(one, two)


# Runs a script's main() and saves, on every rank, the state its train() returns (the scripts themselves
# write on rank 0 only), optionally with float64 as the default dtype.
STATE_PROBE = """
import sys, torch
sys.path.insert(0, {root!r})
import data, {module}
if {float64}:
    torch.set_default_dtype(torch.float64)
real = {module}.train


def spy(*args, **kwargs):
    state = real(*args, **kwargs)
    torch.save({{k: state.get(k) for k in ("params", "optimizer", "inner_state")}}, {out!r} + str(data.RANK) + ".pt")
    return state


{module}.train = spy
{module}.main(sys.argv[1:])
"""


def probe(tmp_path, module, out, float64=False):
    path = tmp_path / f"probe_{module}_{float64}.py"
    path.write_text(STATE_PROBE.format(root=str(ROOT), module=module, out=str(out), float64=float64))
    return path


def tensors(state):
    """Every tensor of a saved state, by a flat name: θ, Adam's moments and step, Reptile's inner m and v."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
    walk("", state)
    return flat


@pytest.mark.parametrize("module, argv", [
    ("maml", ["--meta-batch-size", "5", "--no-baseline"]),
    ("reptile", OMNIGLOT[:4] + ["--meta-batch-size", "3", "--train-shots", "3", "--inner-batch", "3",
                                "--eval-inner-batch", "2"]),
])
def test_every_rank_holds_the_same_parameters_and_optimizer_state(module, argv, tmp_path, omniglot_dir):
    """After 3 meta-iterations on 2 ranks, θ and the optimizer state (MAML's outer Adam, Reptile's inner
    Adam statistics) are bit for bit the same on both ranks (torch.equal)."""
    if "omniglot" in argv:
        argv = argv + ["--data-dir", str(omniglot_dir)]
    states = tmp_path / "state-rank"
    run_ranks(str(probe(tmp_path, module, states)), FAST + argv + FILES, tmp_path / "two")
    a, b = (tensors(torch.load(f"{states}{r}.pt", weights_only=True)) for r in (0, 1))
    assert a.keys() == b.keys() and len(a) > 8
    assert any(".exp_avg" in k for k in a) if module == "maml" else any(k.startswith(".inner_state") for k in a)
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"ranks differ in {unequal}"


def test_reptile_on_two_ranks_is_reptile_on_one_in_float64(tmp_path):
    """Reptile's Eq. (5) mean and its inner Adam statistics, all-reduced over 5 tasks on 2 ranks (3 and 2),
    give the single process's φ and statistics to 1e-12 in float64 after 3 meta-iterations: a wrong weight
    of the ranks' means (× the world size, or unweighted) fails, where float32's 1e-6 could hide it."""
    argv = FAST + ["--meta-batch-size", "5", "--inner-optimizer", "adam"]
    one, two = tmp_path / "one-rank", tmp_path / "two-rank"
    out = subprocess.run([sys.executable, str(probe(tmp_path, "reptile", one, float64=True)), *argv],
                         cwd=tmp_path, env=single_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    run_ranks(str(probe(tmp_path, "reptile", two, float64=True)), argv, tmp_path / "two")
    a, b = tensors(torch.load(f"{one}0.pt", weights_only=True)), tensors(torch.load(f"{two}0.pt", weights_only=True))
    assert a.keys() == b.keys() and any(k.startswith(".inner_state") for k in a)
    assert all(v.dtype == torch.float64 for v in a.values() if v.is_floating_point())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-14)
