"""maml.py's batched meta-gradient against the per-task reference loop (tests/reference.py).

maml.py runs a whole chunk of tasks as one computation (grouped convolutions, per-task BatchNorm
channels, batched matrix products); the reference loop runs torch's layers on one task at a time,
as learn2learn and higher do. In float64 the two meta-gradients must agree to rounding error, for
MAML and ANIL, second and first order, and for any task_chunk."""

from functools import partial
from types import SimpleNamespace

import pytest
import torch

import anil
import maml
from reference import meta_gradient

DT = torch.float64
TASKS, WAYS, SHOTS, QUERY, STEPS, HIDDEN, SIZE = 3, 3, 2, 2, 2, 8, 16
TOL = 1e-10


def setup(model, seed=0):
    """Random float64 params (maml.py's layout, no task dimension) and one batch of T tasks.
    BatchNorm's γ, β are randomized too, so that no gradient is special by symmetry."""
    g = torch.Generator().manual_seed(seed)
    if model == "mlp":
        params = maml.init_mlp([1, 8, 8, 1], g)
        x_s, x_q = (torch.rand(TASKS, n, 1, generator=g) * 10 - 5 for n in (5, 6))
        y_s, y_q = torch.sin(x_s) * 2, torch.sin(x_q) * 2
        batch = tuple(b.to(DT) for b in (x_s, y_s, x_q, y_q))
        return params_to(params, g), batch, 0.05
    # 16x16 images: four stride-2 convs, or four stride-1 convs with 2x2 max-pools, end at 1x1,
    # so the features are HIDDEN-dimensional either way
    params = maml.init_convnet(1, HIDDEN, WAYS, HIDDEN, g)
    x_s = torch.rand(TASKS, WAYS * SHOTS, 1, SIZE, SIZE, generator=g, dtype=DT)
    x_q = torch.rand(TASKS, WAYS * QUERY, 1, SIZE, SIZE, generator=g, dtype=DT)
    y_s = torch.randperm(WAYS, generator=g).repeat_interleave(SHOTS).expand(TASKS, -1).contiguous()
    y_q = torch.randperm(WAYS, generator=g).repeat_interleave(QUERY).expand(TASKS, -1).contiguous()
    return params_to(params, g), (x_s, y_s, x_q, y_q), 0.5


def params_to(params, g):
    return {k: (v + 0.1 * torch.randn(v.shape, generator=g)).to(DT) for k, v in params.items()}


def problem(model, algo):
    """What maml.meta_loss needs of a problem: forward, loss, metric (and, for ANIL, a Net)."""
    max_pool = model == "conv-pool"
    if model == "mlp":
        forward, loss, metric = maml.mlp_forward, maml.mse_per_task, maml.mse_per_task
        net = anil.Net(partial(anil.mlp_body, layers=3), anil.linear_head("fc3.w", "fc3.b"),
                       ("fc3.w", "fc3.b"), ("fc1", "fc2", "head"))
    else:
        forward, loss, metric = partial(maml.conv_forward, max_pool=max_pool), maml.cross_entropy_per_task, maml.accuracy_per_task
        net = anil.Net(partial(maml.conv_body, max_pool=max_pool), anil.linear_head("fc.w", "fc.b"),
                       ("fc.w", "fc.b"), ("conv1", "conv2", "conv3", "conv4", "head"))
    return SimpleNamespace(forward=net if algo == "anil" else forward, loss=loss, metric=metric)


class NoStep:
    """An optimizer that only clears the gradients: maml.meta_step's gradient, θ left as it is."""
    def __init__(self, params):
        self.params = params

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        pass


def ours(model, algo, first_order, path):
    """maml.py's meta-gradient: meta_loss(...).backward() on all T tasks at once, or meta_step
    with task_chunk 1 or 2 (each chunk's graph freed by its own backward pass)."""
    init, batch, inner_lr = setup(model)
    params = {k: v.clone().requires_grad_() for k, v in init.items()}
    adapt = anil.adapt if algo == "anil" else maml.adapt
    chunk = {"meta_loss": TASKS, "chunk1": 1, "chunk2": 2}[path]
    cfg = SimpleNamespace(inner_steps=STEPS, inner_lr=inner_lr, first_order=first_order,
                          task_chunk=chunk, clip_grad=None)
    if path == "meta_loss":
        maml.meta_loss(params, problem(model, algo), batch, cfg, inner_loop=adapt)[0].backward()
    else:
        maml.meta_step(params, NoStep(list(params.values())), problem(model, algo), batch, cfg, inner_loop=adapt)
    return {k: v.grad for k, v in params.items()}


def reference(model, algo, first_order):
    init, batch, inner_lr = setup(model)
    return meta_gradient(init, batch, "mlp" if model == "mlp" else "conv", STEPS, inner_lr, first_order,
                         anil=algo == "anil", max_pool=model == "conv-pool")


def relative_difference(a, b):
    """max |a − b| over every parameter, relative to max |b|."""
    return max((a[k] - b[k]).abs().max().item() for k in b) / max(v.abs().max().item() for v in b.values())


@pytest.mark.parametrize("path", ["meta_loss", "chunk1", "chunk2"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("algo", ["maml", "anil"])
@pytest.mark.parametrize("model", ["mlp", "conv", "conv-pool"])
def test_batched_meta_gradient_matches_per_task_loop(model, algo, first_order, path):
    got, want = ours(model, algo, first_order, path), reference(model, algo, first_order)
    assert set(got) == set(want)
    assert relative_difference(got, want) <= TOL


@pytest.mark.parametrize("algo", ["maml", "anil"])
@pytest.mark.parametrize("model", ["mlp", "conv", "conv-pool"])
def test_the_comparison_can_fail(model, algo):
    """The gradients compared above are not trivially equal: dropping the second-order terms
    changes them far beyond TOL, and ANIL's body gets a gradient (through the query features,
    and in second order through the head's update too)."""
    second, first = reference(model, algo, False), reference(model, algo, True)
    assert relative_difference(first, second) > 1e-4
    assert relative_difference(ours(model, algo, True, "meta_loss"), second) > 1e-4
    if algo == "anil":
        head = ("fc3.w", "fc3.b") if model == "mlp" else ("fc.w", "fc.b")
        for grads in (second, first):
            assert max(v.abs().max().item() for k, v in grads.items() if k not in head) > 1e-6
        # the body's second-order term: its gradient differs between the two orders
        assert max((second[k] - first[k]).abs().max().item() for k in second if k not in head) > 1e-8
