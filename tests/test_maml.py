"""The mathematics of maml.py: meta-gradients against finite differences and closed forms,
the batched-tasks trick against one task at a time, BatchNorm, and reproducibility."""

import platform
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import data
import maml

torch.set_default_dtype(torch.float32)


def mlp_problem(sizes=(1, 4, 4, 1), seed=0, dtype=torch.float64):
    params = {k: v.to(dtype) for k, v in maml.init_mlp(list(sizes), torch.Generator().manual_seed(seed)).items()}
    return data.Problem(params, maml.mlp_forward, maml.mse_per_task, maml.mse_per_task, "mse", None)


def sinusoid_batch(tasks=3, shots=5, query=7, seed=0, dtype=torch.float64):
    b = data.sinusoid_tasks(tasks, shots, query, torch.Generator().manual_seed(seed))
    return tuple(b[k].to(dtype) for k in ("x_support", "y_support", "x_query", "y_query"))


def meta_grad(params, problem, batch, cfg):
    params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    loss, _ = maml.meta_loss(params, problem, batch, cfg)
    return loss, torch.autograd.grad(loss, list(params.values()))


def test_meta_gradient_matches_finite_differences():
    """∇θ of the post-adaptation query loss (two inner steps, second order) against central
    differences of the same loss, in float64."""
    problem = mlp_problem()
    batch = sinusoid_batch()
    cfg = SimpleNamespace(inner_steps=2, inner_lr=0.05, first_order=False)
    _, grads = meta_grad(problem.params, problem, batch, cfg)
    eps = 1e-6
    for (name, p), g in zip(problem.params.items(), grads):
        fd = torch.zeros_like(p)
        for i in range(p.numel()):
            for sign in (1, -1):
                shifted = dict(problem.params)
                q = p.clone().reshape(-1)
                q[i] += sign * eps
                shifted[name] = q.reshape(p.shape)
                with torch.enable_grad():
                    loss, _ = maml.meta_loss({k: v.clone().requires_grad_() for k, v in shifted.items()},
                                             problem, batch, cfg)
                fd.reshape(-1)[i] += sign * loss.item() / (2 * eps)
        torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-7, msg=f"parameter {name}")


def linear_problem(dim, dtype=torch.float64):
    def forward(params, x):            # f(x) = x·w, with x (T, B, d), w (T, d, 1)
        return x @ params["w"]
    w = torch.randn(dim, 1, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return data.Problem({"w": w}, forward, maml.mse_per_task, maml.mse_per_task, "mse", None)


def test_one_step_meta_gradient_closed_form():
    """Linear regression, L(w) = mean((Xw − y)²): ∇L = (2/n) Xᵀ(Xw − y), H = (2/n) XᵀX, and the
    one-step MAML gradient is (I − αH_s) ∇L_q(w′) with w′ = w − α∇L_s(w)."""
    d, n_s, n_q, alpha = 3, 4, 6, 0.1
    g = torch.Generator().manual_seed(0)
    X_s, y_s = torch.randn(1, n_s, d, generator=g, dtype=torch.float64), torch.randn(1, n_s, 1, generator=g, dtype=torch.float64)
    X_q, y_q = torch.randn(1, n_q, d, generator=g, dtype=torch.float64), torch.randn(1, n_q, 1, generator=g, dtype=torch.float64)
    problem = linear_problem(d)
    w = problem.params["w"]
    cfg = SimpleNamespace(inner_steps=1, inner_lr=alpha, first_order=False)
    _, (grad,) = meta_grad(problem.params, problem, (X_s, y_s, X_q, y_q), cfg)

    Xs, Xq, ys, yq = X_s[0], X_q[0], y_s[0], y_q[0]
    grad_s = 2 / n_s * Xs.T @ (Xs @ w - ys)
    H_s = 2 / n_s * Xs.T @ Xs
    w_prime = w - alpha * grad_s
    grad_q = 2 / n_q * Xq.T @ (Xq @ w_prime - yq)
    expected = (torch.eye(d, dtype=torch.float64) - alpha * H_s) @ grad_q
    torch.testing.assert_close(grad, expected)

    # First-order MAML (§5.2): the gradient at θ′ itself, which differs here because H_s ≠ 0.
    cfg.first_order = True
    _, (fo_grad,) = meta_grad(problem.params, problem, (X_s, y_s, X_q, y_q), cfg)
    torch.testing.assert_close(fo_grad, grad_q)
    assert (fo_grad - grad).abs().max() > 1e-3


def test_first_order_gradient_is_query_gradient_at_adapted_params():
    """FOMAML on the MLP, two steps: the meta-gradient equals ∇θ′ L_q(θ′), averaged over tasks,
    and differs from second-order MAML (the ReLU net's Hessian is not zero)."""
    problem = mlp_problem()
    batch = sinusoid_batch(tasks=2)
    cfg = SimpleNamespace(inner_steps=2, inner_lr=0.05, first_order=True)
    _, fo = meta_grad(problem.params, problem, batch, cfg)
    x_s, y_s, x_q, y_q = batch
    theta = {k: v.detach().expand(2, *v.shape).clone().requires_grad_() for k, v in problem.params.items()}
    fast = maml.adapt(theta, problem.forward, problem.loss, x_s, y_s, 2, 0.05, first_order=True)
    fast = {k: v.detach().requires_grad_() for k, v in fast.items()}
    q_grads = torch.autograd.grad(problem.loss(problem.forward(fast, x_q), y_q).mean(), list(fast.values()))
    for a, b in zip(fo, q_grads):
        torch.testing.assert_close(a, b.sum(0))  # the expanded θ sums the per-task rows of the mean
    cfg.first_order = False
    _, so = meta_grad(problem.params, problem, batch, cfg)
    assert max((a - b).abs().max().item() for a, b in zip(fo, so)) > 1e-4


def small_convnet(max_pool, ways=3, channels=1, size=28, hidden=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    params = maml.init_convnet(channels, hidden, ways, maml.conv_feature_dim(size, hidden, max_pool), g)
    params = {k: (v + 0.1 * torch.randn(v.shape, generator=g)).to(dtype) if k.startswith("bn") else v.to(dtype)
              for k, v in params.items()}
    return params, (lambda p, x: maml.conv_forward(p, x, max_pool))


@pytest.mark.parametrize("max_pool,size", [(False, 28), (True, 20)])
def test_batched_tasks_equal_one_task_at_a_time(max_pool, size):
    """The grouped convolution runs T tasks side by side. Its outputs and its second-order
    meta-gradient must equal those of running each task alone and averaging."""
    params, forward = small_convnet(max_pool, size=size)
    problem = data.Problem(params, forward, maml.cross_entropy_per_task, maml.accuracy_per_task, "acc", None)
    g = torch.Generator().manual_seed(1)
    T, N = 3, 3
    x_s = torch.rand(T, N * 2, 1, size, size, generator=g, dtype=torch.float64)
    x_q = torch.rand(T, N * 2, 1, size, size, generator=g, dtype=torch.float64)
    y = torch.arange(N).repeat_interleave(2).expand(T, -1)
    cfg = SimpleNamespace(inner_steps=2, inner_lr=0.3, first_order=False)
    _, together = meta_grad(params, problem, (x_s, y, x_q, y), cfg)
    alone = [meta_grad(params, problem, (x_s[t:t + 1], y[t:t + 1], x_q[t:t + 1], y[t:t + 1]), cfg)[1] for t in range(T)]
    for i, grad in enumerate(together):
        torch.testing.assert_close(grad, sum(a[i] for a in alone) / T)
    out = forward(maml.per_task(params, T), x_q)
    for t in range(T):
        torch.testing.assert_close(out[t:t + 1], forward(maml.per_task(params, 1), x_q[t:t + 1]))


def test_conv_feature_dims_are_the_papers():
    # §5.2: Omniglot 64 filters -> 64-d after the global average; MiniImageNet 32 filters -> 800-d
    assert maml.conv_feature_dim(28, 64, max_pool=False) == 64
    assert maml.conv_feature_dim(84, 32, max_pool=True) == 800
    params, forward = small_convnet(True, size=84, channels=3, hidden=32)
    assert params["fc.w"].shape[0] == 800
    assert forward(maml.per_task(params, 2), torch.rand(2, 3, 3, 84, 84, dtype=torch.float64)).shape == (2, 3, 3)


@pytest.mark.parametrize("mode,independent", [("nontransductive", True), ("transductive", False)])
def test_nontransductive_query_prediction_ignores_other_queries(mode, independent):
    """Reptile §6.1: without transduction, a query's prediction depends on the support set and
    itself only. In transductive mode the BatchNorm statistics mix the queries (the check can fail)."""
    params, forward = small_convnet(False)
    fast = maml.per_task(params, 2)
    g = torch.Generator().manual_seed(2)
    x_s = torch.rand(2, 3, 1, 28, 28, generator=g, dtype=torch.float64)
    x_q = torch.rand(2, 4, 1, 28, 28, generator=g, dtype=torch.float64)
    changed = x_q.clone()
    changed[:, 1:] = torch.rand(2, 3, 1, 28, 28, generator=g, dtype=torch.float64)
    a = maml.predict(fast, forward, x_s, x_q, mode)[:, 0]
    b = maml.predict(fast, forward, x_s, changed, mode)[:, 0]
    assert torch.allclose(a, b) == independent
    if independent:  # and it equals classifying the support set plus that one query
        alone = forward(fast, torch.cat([x_s, x_q[:, :1]], 1))[:, -1]
        torch.testing.assert_close(a, alone)


def test_evaluation_leaves_meta_parameters_untouched():
    problem = mlp_problem(dtype=torch.float32)
    before = {k: v.clone() for k, v in problem.params.items()}
    problem.sample = lambda split, n, g, shots=None, query=None: sinusoid_batch(n, 5, 5, dtype=torch.float32)
    curve = maml.adaptation_curve(problem.params, problem, data.task_batches(problem, "test", 8, 4, 0), 0.01, 3)
    assert curve.shape == (4, 8)
    for k in before:
        assert torch.equal(before[k], problem.params[k])


def test_mean_ci():
    m, c = data.mean_ci([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5
    assert c == pytest.approx(1.96 * 1.2909944487358056 / 2)


def test_task_chunk_and_eval_batch_change_nothing_but_speed():
    """meta_step over chunks of tasks accumulates the same gradient as the whole meta-batch at
    once, and evaluation sees the same tasks whatever its batch size."""
    params, forward = small_convnet(False, dtype=torch.float64)
    problem = data.Problem(params, forward, maml.cross_entropy_per_task, maml.accuracy_per_task, "acc", None)
    g = torch.Generator().manual_seed(3)
    x_s = torch.rand(4, 6, 1, 28, 28, generator=g, dtype=torch.float64)
    x_q = torch.rand(4, 6, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.arange(3).repeat_interleave(2).expand(4, -1)
    grads = []
    for chunk in (4, 1, 3):
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        opt = torch.optim.SGD(p.values(), lr=0.0)
        cfg = SimpleNamespace(inner_steps=2, inner_lr=0.3, first_order=False, task_chunk=chunk)
        loss, _ = maml.meta_step(p, opt, problem, (x_s, y, x_q, y), cfg)
        grads.append([v.grad for v in p.values()])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b)

    split = data.ClassImages.from_lists([torch.full((4, 1, 2, 2), c, dtype=torch.uint8).numpy() for c in range(6)],
                                        list("abcdef"))
    sampler = data.EpisodeSampler(split, 3, 1, 1)
    problem.sample = lambda s, n, gen: sampler.sample(n, gen)
    whole = torch.cat([b[0] for b in data.task_batches(problem, "test", 7, 7, seed=0)])
    pieces = torch.cat([b[0] for b in data.task_batches(problem, "test", 7, 3, seed=0)])
    assert torch.equal(whole, pieces)


KEEP_MEMORY_PROBE = """
import ctypes, sys

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
took = None
if sys.argv[1] == "keep":     # the control run imports nothing that could move glibc's thresholds
    sys.path.insert(0, {root!r})
    import data
    took = data.keep_freed_memory()
block = libc.malloc(16 << 20)          # a 16 MiB tensor's worth
mapped = libc.mallinfo2().hblkhd       # bytes in blocks that malloc took by mmap
libc.free(block)
print(took, mapped >= 16 << 20, libc.mallinfo2().fordblks >= 16 << 20)
"""


def glibc_version():
    name, version = platform.libc_ver()
    return tuple(int(v) for v in version.split(".")[:2]) if name == "glibc" and version else (0, 0)


@pytest.mark.skipif(not sys.platform.startswith("linux") or glibc_version() < (2, 33),
                    reason="keep_freed_memory() only acts on glibc; the probe needs mallinfo2 (glibc 2.33)")
def test_keep_freed_memory_keeps_a_freed_block_in_the_heap(tmp_path):
    # glibc's default maps a fresh 16 MiB block by mmap and unmaps it on free (the page faults
    # keep_freed_memory() removes); with it, the block comes from the heap and stays there free.
    script = tmp_path / "probe.py"
    script.write_text(KEEP_MEMORY_PROBE.format(root=str(Path(__file__).resolve().parent.parent)))
    run = {mode: subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, check=True)
           .stdout.split() for mode in ("default", "keep")}
    assert run["default"] == ["None", "True", "False"]
    assert run["keep"] == ["True", "False", "True"]


def test_clip_grad_clamps_every_meta_gradient_entry():
    """--clip-grad c (the reference's MiniImageNet setting): Adam sees the gradient clamped to ±c."""
    problem = mlp_problem(dtype=torch.float32)
    batch = sinusoid_batch(dtype=torch.float32)
    for clip in (None, 1e-3):
        params = {k: v.clone().requires_grad_() for k, v in problem.params.items()}
        opt = torch.optim.SGD(params.values(), lr=0.0)
        cfg = SimpleNamespace(inner_steps=1, inner_lr=0.05, first_order=False, task_chunk=None, clip_grad=clip)
        maml.meta_step(params, opt, problem, batch, cfg)
        biggest = max(p.grad.abs().max().item() for p in params.values())
        assert (biggest <= 1.000001e-3) if clip else (biggest > 1e-2)   # float32 rounding of 1e-3
    assert maml.paper_settings("miniimagenet", 5, 1)["clip_grad"] == pytest.approx(10.0 / 75)   # ±10 on a sum 75 times ours


def test_the_presets_take_the_authors_step_in_our_loss_convention():
    """cbfinn/maml's inner loss is the cross-entropy summed over the N·K support examples, divided by K.
    Its step with the printed α must equal ours, on our mean loss, with the preset's α; and its ±10
    clip of the summed outer loss (over N·Q queries, divided by K) must bind where ours does."""
    g = torch.Generator().manual_seed(0)
    for (dataset, ways, shots, printed) in [("omniglot", 5, 1, 0.4), ("omniglot", 20, 1, 0.1),
                                            ("miniimagenet", 5, 1, 0.01), ("miniimagenet", 5, 5, 0.01)]:
        s = maml.paper_settings(dataset, ways, shots)
        assert s["inner_lr"] == pytest.approx(ways * printed)
        params = {k: v.double().requires_grad_() for k, v in maml.init_convnet(1, 4, ways, 4, g).items()}
        x = torch.rand(1, ways * shots, 1, 28, 28, generator=g, dtype=torch.float64)
        y = torch.arange(ways).repeat_interleave(shots)[None]
        out = maml.conv_forward(maml.per_task(params, 1), x, False)
        theirs = F.cross_entropy(out[0], y[0], reduction="sum") / shots          # cbfinn's xent / K, summed
        ours = maml.cross_entropy_per_task(out, y).sum()
        g_theirs = torch.autograd.grad(theirs, list(params.values()), retain_graph=True)
        g_ours = torch.autograd.grad(ours, list(params.values()))
        for a, b in zip(g_theirs, g_ours):
            torch.testing.assert_close(printed * a, s["inner_lr"] * b)           # the same inner step
        if dataset == "miniimagenet":    # outer: theirs is N·Q/K times ours, so the clip scales alike
            assert s["clip_grad"] * ways * s["query"] / shots == pytest.approx(10.0)
    # The sinusoid: cbfinn's MSE is a mean over the K points, as ours, and its command for §5.1 runs at
    # --update_lr's default, 1e-3 (main.py), not the printed 0.01: the same step on the same loss.
    s = maml.paper_settings("sinusoid", 5, 10)
    params = {k: v.double().requires_grad_() for k, v in maml.init_mlp([1, 40, 40, 1], g).items()}
    x = torch.rand(1, 10, 1, generator=g, dtype=torch.float64) * 10 - 5
    out = maml.mlp_forward(maml.per_task(params, 1), x)
    theirs = torch.mean((out.reshape(-1) - torch.sin(x).reshape(-1)) ** 2)
    ours = maml.mse_per_task(out, torch.sin(x)).sum()
    g_theirs = torch.autograd.grad(theirs, list(params.values()), retain_graph=True)
    g_ours = torch.autograd.grad(ours, list(params.values()))
    for a, b in zip(g_theirs, g_ours):
        torch.testing.assert_close(1e-3 * a, s["inner_lr"] * b)
    assert maml.PAPER_SETTINGS["sinusoid"]["inner_lr"] == 0.01              # the printed value, kept visible


def test_top_curvature_is_the_hessians_extreme_eigenvalue():
    """Power iteration on Hessian-vector products against the exact Hessian of each task's support loss."""
    g = torch.Generator().manual_seed(0)
    params = {k: v.double() for k, v in maml.init_mlp([1, 4, 4, 1], g).items()}
    T, K = 3, 5
    x = torch.rand(T, K, 1, generator=g, dtype=torch.float64) * 10 - 5
    y = torch.sin(x)
    lam = maml.top_curvature(maml.per_task(params, T), maml.mlp_forward, maml.mse_per_task, x, y,
                             torch.Generator().manual_seed(1), iterations=500)
    names, shapes = list(params), [v.shape for v in params.values()]
    for t in range(T):
        def loss(*flat):
            p = {n: f.reshape(1, *s) for n, f, s in zip(names, flat, shapes)}
            return maml.mse_per_task(maml.mlp_forward(p, x[t:t + 1]), y[t:t + 1]).sum()
        blocks = torch.autograd.functional.hessian(loss, tuple(v.reshape(-1) for v in params.values()))
        H = torch.cat([torch.cat(row, 1) for row in blocks], 0)
        eig = torch.linalg.eigvalsh(H)
        extreme = eig[eig.abs().argmax()]
        assert lam[t].item() == pytest.approx(extreme.item(), rel=1e-6)


def test_steps_diverge_exactly_where_alpha_times_curvature_exceeds_two():
    """The mechanism behind the sinusoid's few worse-getting tasks, on a model whose loss is exactly
    quadratic (a linear regressor): repeated steps of α shrink the loss when αλ < 2 and blow it up when
    αλ > 2."""
    g = torch.Generator().manual_seed(0)
    params = {k: v.double() for k, v in maml.init_mlp([1, 1], g).items()}
    x = torch.rand(1, 5, 1, generator=g, dtype=torch.float64) * 10 - 5
    y = 3 * x + 1
    lam = maml.top_curvature(maml.per_task(params, 1), maml.mlp_forward, maml.mse_per_task, x, y,
                             torch.Generator().manual_seed(1), iterations=200).item()
    for factor, grows in ((1.9, False), (2.1, True)):
        problem = data.Problem(params, maml.mlp_forward, maml.mse_per_task, maml.mse_per_task, "mse",
                               lambda split, tasks, gen, shots=None, query=None: (x, y, x, y))
        curve = maml.adaptation_curve(params, problem, [(x, y, x, y)], factor / lam, 30)
        assert (curve[-1, 0] > curve[1, 0]) == grows, (factor, curve[:, 0])
