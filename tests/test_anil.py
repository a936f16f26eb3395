"""The mathematics of anil.py: the closed form of App. E.2, the frozen body, the meta-gradient
against finite differences, CCA/CKA on known cases, the freezing experiment against maml.py, and
every CLI path on the tiny fixtures."""

import dataclasses
import json
import subprocess
import sys
from types import SimpleNamespace

import importlib.util

import pytest
import torch

import anil
import data
import maml
from conftest import ROOT

# ---------------------------------------------------------------------------------------------
# App. E.2: the two-layer scalar linear network ŷ = θ2·θ1·x
# ---------------------------------------------------------------------------------------------


def scalar_net():
    """Body θ1·x, head θ2·(features): App. E.2's network, in the Net form of anil.py."""
    def body(p, x):                                   # x (T, B, 1), θ1 (T, 1)
        return x * p["w1"].reshape(-1, 1, 1)

    def head(p, f):
        return f * p["w2"].reshape(-1, 1, 1)
    return anil.Net(body, head, ("w2",), ("body", "head"))


def scalar_problem():
    return data.Problem(None, scalar_net(), maml.mse_per_task, maml.mse_per_task, "mse", None)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("inner_lr", [1.0, 0.03])
def test_outer_gradient_matches_closed_form_eqs_9_10(first_order, inner_lr):
    """Eq. (9)-(10): ŷ(x2; θ_ANIL) = (θ2 − α ∂L(ŷ(x1), y1)/∂θ2)·θ1·x2, with θ1 not adapted
    (the paper writes α = 1). With L = (ŷ − y)², ∂L1/∂θ2 = 2 e1 θ1 x1, e1 = θ2θ1x1 − y1, so
        θ2' = θ2 − 2α e1 θ1 x1,   ∂θ2'/∂θ1 = −2α x1 (2 θ2θ1x1 − y1),   ∂θ2'/∂θ2 = 1 − 2α (θ1x1)²,
    and with e2 = θ2'θ1x2 − y2 the outer gradients of L2 = e2² are
        ∂L2/∂θ1 = 2 e2 (θ2' x2 + θ1 x2 ∂θ2'/∂θ1),    ∂L2/∂θ2 = 2 e2 θ1 x2 ∂θ2'/∂θ2.
    The second-order terms (those with ∂θ2'/∂θ) reach the body θ1 only through the head's
    update, and first-order ANIL drops them (∂θ2'/∂θ1 = 0, ∂θ2'/∂θ2 = 1)."""
    dt = torch.float64
    g = torch.Generator().manual_seed(0)
    T = 4
    x1, y1, x2, y2 = (torch.randn(T, 1, 1, generator=g, dtype=dt) for _ in range(4))
    t1, t2 = torch.tensor([0.7], dtype=dt), torch.tensor([-1.3], dtype=dt)
    params = {"w1": t1.clone().requires_grad_(), "w2": t2.clone().requires_grad_()}
    cfg = SimpleNamespace(inner_steps=1, inner_lr=inner_lr, first_order=first_order)
    loss, _ = anil.meta_loss(params, scalar_problem(), (x1, y1, x2, y2), cfg)
    g1, g2 = torch.autograd.grad(loss, [params["w1"], params["w2"]])

    a, b = t1.item(), t2.item()
    x1, y1, x2, y2 = (v.reshape(T) for v in (x1, y1, x2, y2))
    e1 = b * a * x1 - y1
    b_new = b - inner_lr * 2 * e1 * a * x1                          # Eq. (2) for θ2, Eq. (4): θ1 unchanged
    db_da = torch.zeros(T, dtype=dt) if first_order else -2 * inner_lr * x1 * (2 * b * a * x1 - y1)
    db_db = torch.ones(T, dtype=dt) if first_order else 1 - 2 * inner_lr * (a * x1) ** 2
    e2 = b_new * a * x2 - y2                                        # Eq. (10)
    # Eq. (9), the sum over tasks; anil.meta_loss averages over the T tasks
    expect1 = (2 * e2 * (b_new * x2 + a * x2 * db_da)).sum() / T
    expect2 = (2 * e2 * a * x2 * db_db).sum() / T
    torch.testing.assert_close(g1, torch.tensor([expect1.item()], dtype=dt), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g2, torch.tensor([expect2.item()], dtype=dt), rtol=1e-12, atol=1e-12)
    second_order_term = (2 * e2 * a * x2 * -2 * inner_lr * x1 * (2 * b * a * x1 - y1)).sum() / T
    assert abs(second_order_term.item()) > 1e-3           # the term exists and would have been caught


def test_first_order_drops_exactly_the_head_path_to_the_body():
    """Second-order minus first-order gradient of the body θ1 is exactly the term through the head's
    update, Σ_i 2 e2 θ1 x2 ∂θ2'/∂θ1 / T (Eq. 9-10 above): nothing more, nothing less."""
    dt = torch.float64
    g = torch.Generator().manual_seed(1)
    T, alpha = 3, 0.3
    x1, y1, x2, y2 = (torch.randn(T, 1, 1, generator=g, dtype=dt) for _ in range(4))
    a, b = 0.5, 2.0
    grads = {}
    for fo in (False, True):
        params = {"w1": torch.tensor([a], dtype=dt, requires_grad=True),
                  "w2": torch.tensor([b], dtype=dt, requires_grad=True)}
        cfg = SimpleNamespace(inner_steps=1, inner_lr=alpha, first_order=fo)
        loss, _ = anil.meta_loss(params, scalar_problem(), (x1, y1, x2, y2), cfg)
        grads[fo] = torch.autograd.grad(loss, [params["w1"]])[0]
    x1, y1, x2, y2 = (v.reshape(T) for v in (x1, y1, x2, y2))
    b_new = b - alpha * 2 * (b * a * x1 - y1) * a * x1
    e2 = b_new * a * x2 - y2
    head_path = (2 * e2 * a * x2 * -2 * alpha * x1 * (2 * b * a * x1 - y1)).sum() / T
    assert abs(head_path.item()) > 1e-2
    torch.testing.assert_close(grads[False] - grads[True], head_path.reshape(1), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The inner loop leaves the body alone; the model halves equal maml.py's forwards
# ---------------------------------------------------------------------------------------------

def conv_setup(max_pool, ways=3, size=28, hidden=8, tasks=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    dim = maml.conv_feature_dim(size, hidden, max_pool)
    params = {k: v.to(dtype) for k, v in maml.init_convnet(1, hidden, ways, dim, g).items()}
    problem = data.Problem(params, lambda p, x: maml.conv_forward(p, x, max_pool), maml.cross_entropy_per_task,
                           maml.accuracy_per_task, "acc", None)
    net = anil.make_net(SimpleNamespace(dataset="omniglot" if not max_pool else "miniimagenet"), problem)
    x = torch.rand(tasks, ways * 2, 1, size, size, generator=g, dtype=dtype)
    y = torch.arange(ways).repeat(2).expand(tasks, -1)
    return params, problem, net, x, y


@pytest.mark.parametrize("max_pool,size", [(False, 28), (True, 32)])
def test_body_then_head_is_maml_forward(max_pool, size):
    params, problem, net, x, _ = conv_setup(max_pool, size=size)
    p = maml.per_task(params, x.shape[0])
    torch.testing.assert_close(net(p, x), problem.forward(p, x), rtol=1e-12, atol=1e-12)
    acts = net.layer_outputs(p, x)
    assert len(acts) == 5 and acts[3].shape[:3] == (x.shape[0], x.shape[1], 8)
    torch.testing.assert_close(acts[-1], net(p, x))
    mlp = data.Problem(maml.init_mlp([1, 40, 40, 1], torch.Generator().manual_seed(0)), maml.mlp_forward,
                       maml.mse_per_task, maml.mse_per_task, "mse", None)
    mnet = anil.make_net(SimpleNamespace(dataset="sinusoid"), mlp)
    xs = torch.randn(3, 5, 1)
    p = maml.per_task(mlp.params, 3)
    torch.testing.assert_close(mnet(p, xs), maml.mlp_forward(p, xs))
    assert mnet.head_keys == ("fc3.w", "fc3.b")


def test_body_is_bit_identical_after_the_inner_loop():
    params, problem, net, x, y = conv_setup(False, dtype=torch.float32)
    theta = {k: v.clone().requires_grad_() for k, v in maml.per_task(params, x.shape[0]).items()}
    before = {k: v.detach().clone() for k, v in theta.items()}
    fast = anil.adapt(theta, net, problem.loss, x, y, inner_steps=3, inner_lr=0.4, first_order=False)
    for k in theta:
        if k in net.head_keys:
            assert not torch.equal(fast[k], before[k]), k
        else:
            assert fast[k] is theta[k] and torch.equal(fast[k], before[k]), k


def test_adapt_equals_maml_inner_loop_with_the_body_frozen():
    """ANIL's inner loop, computed another way: maml.adapt over the head with the body held out."""
    params, problem, net, x, y = conv_setup(True, size=32)
    theta = {k: v.clone().requires_grad_() for k, v in maml.per_task(params, x.shape[0]).items()}
    body = [k for k in theta if k not in net.head_keys]
    a = anil.adapt(theta, net, problem.loss, x, y, 2, 0.1, first_order=True)
    b = anil.adapt_unfrozen(theta, problem.forward, problem.loss, x, y, 2, 0.1, True, body)
    for k in theta:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)


def test_meta_gradient_matches_finite_differences():
    """∇θ of ANIL's query loss after two second-order head steps, against central differences."""
    dt = torch.float64
    params = {k: v.to(dt) for k, v in maml.init_mlp([1, 4, 4, 1], torch.Generator().manual_seed(0)).items()}
    problem = data.Problem(params, maml.mlp_forward, maml.mse_per_task, maml.mse_per_task, "mse", None)
    problem.forward = anil.make_net(SimpleNamespace(dataset="sinusoid"), problem)
    b = data.sinusoid_tasks(3, 5, 7, torch.Generator().manual_seed(0))
    batch = tuple(b[k].to(dt) for k in ("x_support", "y_support", "x_query", "y_query"))
    cfg = SimpleNamespace(inner_steps=2, inner_lr=0.05, first_order=False)

    def loss_at(p):
        return anil.meta_loss({k: v.clone().requires_grad_() for k, v in p.items()}, problem, batch, cfg)[0]
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    loss, _ = anil.meta_loss(leaves, problem, batch, cfg)
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    eps = 1e-6
    for name, p in params.items():
        fd = torch.zeros(p.numel(), dtype=dt)
        for i in range(p.numel()):
            for sign in (1, -1):
                q = p.clone().reshape(-1)
                q[i] += sign * eps
                fd[i] += sign * loss_at({**params, name: q.reshape(p.shape)}).item() / (2 * eps)
        torch.testing.assert_close(grads[name].reshape(-1), fd, rtol=1e-5, atol=1e-7, msg=name)
    assert grads["fc1.w"].abs().sum() > 0         # the body learns, through the outer loop only


# ---------------------------------------------------------------------------------------------
# CCA and CKA on known cases
# ---------------------------------------------------------------------------------------------

def features(n=500, d=12, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identical_representations_score_one():
    x = features()
    assert anil.cca(x, x) == pytest.approx(1.0, abs=1e-9)
    assert anil.linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)


def test_cca_is_invariant_to_invertible_linear_maps():
    x, y = features(seed=0), features(seed=1)
    y = 0.6 * x + 0.8 * y                                     # correlated with x
    g = torch.Generator().manual_seed(2)
    a = torch.randn(12, 12, generator=g, dtype=torch.float64) + 3 * torch.eye(12, dtype=torch.float64)
    b = torch.randn(12, 12, generator=g, dtype=torch.float64) + 3 * torch.eye(12, dtype=torch.float64)
    assert anil.cca(x @ a, y @ b) == pytest.approx(anil.cca(x, y), abs=1e-9)
    assert anil.cca(x, x @ a + 5.0) == pytest.approx(1.0, abs=1e-9)      # an affine map of x is x again


def test_cca_matches_the_covariance_formula():
    """The canonical correlations are the square roots of the eigenvalues of
    Σxx⁻¹ Σxy Σyy⁻¹ Σyx: the textbook CCA, computed another way."""
    x, y = features(seed=3, d=5), features(seed=4, d=7)
    y[:, :5] += x
    xc, yc = x - x.mean(0), y - y.mean(0)
    sxx, syy, sxy = xc.T @ xc, yc.T @ yc, xc.T @ yc
    m = torch.linalg.solve(sxx, sxy) @ torch.linalg.solve(syy, sxy.T)
    rho = torch.linalg.eigvals(m).real.clamp(min=0).sqrt().sort(descending=True).values
    assert anil.cca(x, y) == pytest.approx(rho.mean().item(), abs=1e-9)


def test_cka_is_invariant_to_orthogonal_maps_and_isotropic_scaling_but_not_any_linear_map():
    x, y = features(seed=0), features(seed=1)
    y = 0.6 * x + 0.8 * y
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    base = anil.linear_cka(x, y)
    assert anil.linear_cka(x @ q, y) == pytest.approx(base, abs=1e-9)
    assert anil.linear_cka(x, 7.5 * y) == pytest.approx(base, abs=1e-9)
    stretch = torch.diag(torch.logspace(-2, 2, 12, dtype=torch.float64))
    assert abs(anil.linear_cka(x @ stretch, y) - base) > 1e-3        # CKA, unlike CCA, is not


def test_values_lie_in_unit_interval_and_are_low_for_independent_features():
    for seed in range(5):
        x, y = features(n=2000, d=10, seed=seed), features(n=2000, d=10, seed=seed + 100)
        c, k = anil.cca(x, y), anil.linear_cka(x, y)
        assert 0 <= c <= 0.15 and 0 <= k <= 0.05, (c, k)
        z = torch.relu(features(n=50, d=30, seed=seed))               # fewer points than neurons
        assert 0 <= anil.cca(z, y[:50]) <= 1 + 1e-9 and 0 <= anil.linear_cka(z, y[:50]) <= 1 + 1e-9
    dead = features(n=200, d=6)
    dead[:, 0] = 0.0                                                  # a dead ReLU unit
    assert anil.cca(dead, dead) == pytest.approx(1.0, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Freezing and similarity against maml.py
# ---------------------------------------------------------------------------------------------

def image_problem(max_pool=False, ways=3):
    params, problem, net, _, _ = conv_setup(max_pool, ways=ways, dtype=torch.float32)

    def sample(split, tasks, g):
        x_s = torch.rand(tasks, ways, 1, 28, 28, generator=g)
        x_q = torch.rand(tasks, ways * 2, 1, 28, 28, generator=g)
        y = torch.arange(ways)
        return x_s, y.expand(tasks, -1), x_q, y.repeat(2).expand(tasks, -1)
    problem.sample = sample
    return {k: v.float() for k, v in params.items()}, problem, net


def test_freezing_nothing_is_maml_and_freezing_the_body_is_anil():
    params, problem, net = image_problem()
    cfg = SimpleNamespace(inner_lr=0.4, eval_steps=2, test_tasks=6, eval_chunk=4, seed=0, bn_mode="transductive",
                          ways=3, shots=1)
    batches = data.task_batches(problem, "test", 6, 4, 2)
    reference = maml.adaptation_curve(params, problem, batches, 0.4, 2)[-1]
    anil_curve = anil.evaluate(params, dataclasses.replace(problem, forward=net), "test", 6, 2, cfg)[-1]
    table = anil.freeze_table(cfg, problem, net, params)
    assert list(table)[:5] == ["none", "1", "1-2", "1-3", "1-4"] and list(table)[5] == "1-4 w"
    assert table["none"][0] == pytest.approx(reference.mean()) and table["1-4"][0] == pytest.approx(anil_curve.mean())
    layers = anil.body_layers(params, net)
    assert layers[1] == ["conv1.w", "bn1.w", "bn1.b"] and len(layers) == 4


def test_similarity_without_adaptation_is_perfect():
    params, problem, net = image_problem()
    cfg = SimpleNamespace(inner_lr=0.4, eval_steps=0, similarity_tasks=3, similarity_query=2, eval_chunk=2, seed=0,
                          ways=3, shots=1, query=2, device="cpu")
    s = anil.similarity(cfg, problem, net, params, splits=None)
    for layer in net.layer_names:
        assert s["cca"][layer][0] == pytest.approx(1.0) and s["cka"][layer][0] == pytest.approx(1.0)
        assert s["distance"][layer][0] == 0.0
    cfg.eval_steps = 2
    s = anil.similarity(cfg, problem, net, params, splits=None)
    assert s["distance"]["head"][0] > 0 and s["cka"]["head"][0] < 1


# ---------------------------------------------------------------------------------------------
# The command line, in a subprocess and in-process
# ---------------------------------------------------------------------------------------------

TINY = ["--iterations", "3", "--meta-batch-size", "2", "--val-tasks", "2", "--test-tasks", "4",
        "--eval-steps", "1", "--inner-steps", "1"]


def run(*args, check=True):
    p = subprocess.run([sys.executable, str(ROOT / "anil.py"), *map(str, args)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"anil.py {' '.join(map(str, args))} failed:\n{p.stdout}\n{p.stderr}")
    return p


HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def test_omniglot_cli_with_analyses_on_a_maml_checkpoint(omniglot_dir, tmp_path):
    out, fig, ckpt = tmp_path / "r.json", tmp_path / "sim.png", tmp_path / "a.pt"
    p = run("--dataset", "omniglot", "--data-dir", omniglot_dir, "--ways", "3", *TINY, "--save", ckpt, "--out", out)
    assert "test_acc=" in p.stdout and "config:" in p.stdout
    r = json.loads(out.read_text())
    assert r["config"]["inner_lr"] == 1.2 and r["iteration"] == 3      # 3 × the printed 0.4, as maml.py
    assert torch.load(ckpt)["algorithm"] == "anil"
    mckpt = tmp_path / "m.pt"
    maml.main(["--dataset", "omniglot", "--data-dir", str(omniglot_dir), "--ways", "3", *TINY, "--save", str(mckpt)])
    p = run("--eval-only", "--load", mckpt, "--freeze-table", "--similarity", "--similarity-tasks", "3",
            "--similarity-query", "2", *(["--plot", fig] if HAVE_MATPLOTLIB else []), "--out", out)
    assert "trained by maml.py" in p.stdout and "Freezing (§2, Table 2)" in p.stdout and "1-4" in p.stdout
    assert "conv4" in p.stdout and (not HAVE_MATPLOTLIB or fig.stat().st_size > 5000)
    r = json.loads(out.read_text())
    assert {"none", "1", "1-2", "1-3", "1-4"} < set(r["freeze_table"]) and "cka" in r["similarity"]
    with pytest.raises(SystemExit, match="written by maml.py; this takes anil.py checkpoints"):
        anil.main(["--resume", str(mckpt)])


def test_sinusoid_and_miniimagenet(mini_dir, capsys):
    r = anil.main(["--iterations", "5", "--test-tasks", "4", "--val-tasks", "2", "--eval-steps", "2"])
    assert len(r["test"]["mse_by_step"]) == 3 and r["config"]["inner_lr"] == maml.SINUSOID_AUTHORS_LR == 1e-3
    r = anil.main(["--dataset", "miniimagenet", "--data-dir", str(mini_dir), "--query", "2", *TINY])
    assert 0 <= r["test"]["acc"] <= 1 and r["config"]["inner_steps"] == 1


def test_timing_table(capsys):
    """Table 4 on a smaller image (the command itself uses 84x84): every entry, each speed-up the
    ratio of the measured times, and the relation the paper reports, from the measurements: ANIL's
    inference (10 head-only steps on features computed once) is faster than MAML's (10 steps through
    the whole network), by far more than timing noise (it does a tenth of the convolutions)."""
    cfg = SimpleNamespace(device="cpu", seed=0, timing_batches=3)
    out = anil.timing(cfg, image_size=42)
    assert set(out) == {f"{phase}_{k}shot_{a}" for phase, algs in (("train", ("MAML", "FOMAML", "ANIL")),
                        ("inference", ("MAML", "ANIL"))) for k in (1, 5) for a in algs}
    for key, entry in out.items():
        maml_entry = out[key.rsplit("_", 1)[0] + "_MAML"]
        assert entry["speedup"] == pytest.approx(maml_entry["mean_ms"] / entry["mean_ms"])
    for shots in (1, 5):
        assert out[f"inference_{shots}shot_ANIL"]["median_ms"] < out[f"inference_{shots}shot_MAML"]["median_ms"]


@pytest.mark.parametrize("argv,message", [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--similarity-tasks", "0"], "--similarity-tasks 0: must be at least 1"),
    (["--eval-only"], "--eval-only needs --load"),
    (["--plot", "x.png"], "--plot draws the --similarity bars"),
])
def test_errors_are_clear(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        anil.main(argv)
    assert message in str(e.value) + capsys.readouterr().err


def quick(*extra):
    return ["--iterations", "20", "--meta-batch-size", "4", "--val-every", "5", "--val-tasks", "4",
            "--test-tasks", "8", "--eval-steps", "2", *map(str, extra)]


def without_times(history):
    return [{k: v for k, v in line.items() if k != "elapsed_s"} for line in history]


def test_same_seed_same_numbers_and_resume_continues_identically(tmp_path):
    a = anil.main(quick("--seed", "3", "--save", tmp_path / "full.pt"))
    b = anil.main(quick("--seed", "3"))
    c = anil.main(quick("--seed", "4"))
    assert a["test"] == b["test"] and without_times(a["history"]) == without_times(b["history"])
    assert a["test"] != c["test"]
    anil.main(quick("--seed", "3", "--save", tmp_path / "half.pt", "--iterations", "10"))
    resumed = anil.main(quick("--seed", "3", "--resume", tmp_path / "half.pt", "--save", tmp_path / "half.pt"))
    full, half = torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "half.pt")
    assert half["iteration"] == 20
    for k in full["params"]:
        assert torch.equal(full["params"][k], half["params"][k]), k
    assert resumed["test"] == a["test"] and without_times(resumed["history"]) == without_times(a["history"])
    assert anil.main(["--eval-only", "--load", str(tmp_path / "full.pt"), "--test-tasks", "8"])["test"] == a["test"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = maml.meta_loss

    def poisoned(*args):
        calls["n"] += 1
        loss, metric = original(*args)
        return (loss * float("nan") if calls["n"] > 5 else loss), metric
    monkeypatch.setattr(maml, "meta_loss", poisoned)
    ckpt = tmp_path / "c.pt"
    with pytest.raises(SystemExit, match=r"meta-loss is nan at iteration 6.*last good checkpoint"):
        anil.main(quick("--save", ckpt, "--val-every", "2"))
    state = torch.load(ckpt)
    assert state["iteration"] == 4 and all(torch.isfinite(v).all() for v in state["params"].values())


def test_anil_training_leaves_the_initial_params_untouched():
    """anil.py trains with maml.train, which works on a copy: the seed's initialization (nil.py's
    random body of Table 5) must survive training unchanged."""
    cfg = maml.finalize_config(maml.build_parser().parse_args(
        ["--iterations", "2", "--meta-batch-size", "2", "--val-tasks", "2", "--no-baseline", "--device", "cpu"]))
    problem = maml.make_problem(cfg, torch.device("cpu"))
    problem.forward = anil.make_net(cfg, problem)
    init = {k: v.clone() for k, v in problem.params.items()}
    state = maml.train(cfg, problem, {"params": problem.params, "iteration": 0}, anil.adapt, "anil")
    assert all(torch.equal(init[k], problem.params[k]) for k in init)
    assert any(not torch.equal(init[k], state["params"][k]) for k in init)
    assert state["algorithm"] == "anil"
