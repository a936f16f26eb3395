"""nil.py: the cosine classifier's invariances (no head, scale-free, exact on a copy of a support
example), against a loop written out, and the command line on the tiny fixtures."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import anil
import data
import maml
import nil
from conftest import ROOT


def conv_model(ways=4, hidden=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = maml.init_convnet(1, hidden, ways, maml.conv_feature_dim(28, hidden, False), g)
    problem = data.Problem(params, lambda p, x: maml.conv_forward(p, x, False), maml.cross_entropy_per_task,
                           maml.accuracy_per_task, "acc", None)
    return params, problem, anil.make_net(SimpleNamespace(dataset="omniglot"), problem)


def episode(tasks=2, ways=4, shots=2, query=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x_s = torch.rand(tasks, ways * shots, 1, 28, 28, generator=g)
    x_q = torch.rand(tasks, ways * query, 1, 28, 28, generator=g)
    return x_s, torch.arange(ways).repeat_interleave(shots).expand(tasks, -1), x_q


@pytest.mark.parametrize("bn_mode", ["transductive", "nontransductive"])
def test_predictions_do_not_depend_on_the_head(bn_mode):
    params, _, net = conv_model()
    x_s, y_s, x_q = episode()
    p = maml.per_task(params, 2)
    other = dict(p, **{"fc.w": torch.randn_like(p["fc.w"]) * 100, "fc.b": torch.randn_like(p["fc.b"])})
    a = nil.nil_predict(p, net, x_s, y_s, x_q, 4, bn_mode)
    assert torch.equal(a, nil.nil_predict(other, net, x_s, y_s, x_q, 4, bn_mode))
    assert a.shape == (2, 12, 4)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 12))


def test_scaling_a_feature_vector_changes_nothing():
    g = torch.Generator().manual_seed(0)
    f_s, f_q = torch.randn(3, 10, 16, generator=g), torch.randn(3, 7, 16, generator=g)
    y_s = torch.arange(5).repeat(2).expand(3, -1)
    base = nil.cosine_classify(f_s, y_s, f_q, 5)
    scale_s = torch.rand(3, 10, 1, generator=g) * 50 + 0.01
    scale_q = torch.rand(3, 7, 1, generator=g) * 50 + 0.01
    torch.testing.assert_close(nil.cosine_classify(f_s * scale_s, y_s, f_q * scale_q, 5), base)


def test_a_query_equal_to_a_support_example_gets_its_class():
    """One distinct support example per class: a copy of support example j is labelled j."""
    g = torch.Generator().manual_seed(0)
    f_s = torch.randn(4, 5, 32, generator=g)
    perm = torch.stack([torch.randperm(5, generator=g) for _ in range(4)])        # (T, 5)
    y_s = torch.stack([torch.randperm(5, generator=g) for _ in range(4)])         # shuffled labels
    f_q = torch.gather(f_s, 1, perm[..., None].expand(-1, -1, 32))
    pred = nil.cosine_classify(f_s, y_s, f_q, 5).argmax(-1)
    assert torch.equal(pred, torch.gather(y_s, 1, perm))


def test_cosine_classify_matches_a_loop():
    g = torch.Generator().manual_seed(3)
    f_s, f_q = torch.randn(1, 6, 8, generator=g), torch.randn(1, 4, 8, generator=g)
    y_s = torch.tensor([[0, 0, 1, 1, 2, 2]])
    out = nil.cosine_classify(f_s, y_s, f_q, 3)
    for m in range(4):
        cos = torch.tensor([F.cosine_similarity(f_q[0, m], f_s[0, i], dim=0) for i in range(6)])
        a = cos.exp() / cos.exp().sum()
        expect = torch.tensor([a[y_s[0] == c].sum() for c in range(3)])
        torch.testing.assert_close(out[0, m], expect)


def test_nil_accuracy_counts_correct_queries():
    params, problem, net = conv_model(ways=2)
    x_s, y_s, _ = episode(tasks=3, ways=2, shots=1)
    # the query set is the support set itself, so NIL predicts each query's own support label; the
    # labels given as the truth are wrong for none, one and both queries of the three tasks
    y_q = y_s.clone()
    y_q[1, 0] = 1 - y_q[1, 0]
    y_q[2] = 1 - y_q[2]
    acc = nil.nil_accuracy(params, problem, net, [(x_s, y_s, x_s, y_q)], 2, "transductive")
    assert acc.tolist() == [1.0, 0.5, 0.0]


def run(*args, check=True):
    p = subprocess.run([sys.executable, str(ROOT / "nil.py"), *map(str, args)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"nil.py {' '.join(map(str, args))} failed:\n{p.stdout}\n{p.stderr}")
    return p


TINY = ["--ways", "3", "--iterations", "3", "--meta-batch-size", "2", "--val-tasks", "2", "--test-tasks", "4",
        "--eval-steps", "1"]


def test_cli_trains_anil_then_nil_and_the_head_body_study(omniglot_dir, tmp_path):
    out, ckpt, mckpt = tmp_path / "r.json", tmp_path / "a.pt", tmp_path / "m.pt"
    p = run("--data-dir", omniglot_dir, *TINY, "--save", ckpt, "--head-body", "--pretrain-iterations", "2",
            "--head-iterations", "2", "--out", out)
    assert "NIL (no head, cosine)" in p.stdout and "ANIL head" in p.stdout and "Random features" in p.stdout
    r = json.loads(out.read_text())
    assert r["algorithm"] == "anil" and set(r["test"]) == {"nil", "anil_head", "nil_minus_head"}
    assert len(r["head_body"]) == 8
    maml.main(["--dataset", "omniglot", "--data-dir", str(omniglot_dir), *TINY, "--save", str(mckpt)])
    r = nil.main(["--eval-only", "--load", str(mckpt), "--test-tasks", "4", "--out", str(out)])
    assert r["algorithm"] == "maml" and "maml_head" in r["test"]
    r = nil.main(["--eval-only", "--load", str(ckpt), "--head-body", "--maml-checkpoint", str(mckpt),
                  "--pretrain-iterations", "1", "--head-iterations", "1"])
    assert "MAML training / MAML head" in r["head_body"] and len(r["head_body"]) == 10
    # the MAML rows, against maml.py's own test of the same checkpoint on the same tasks
    own = maml.main(["--eval-only", "--load", str(mckpt), "--test-tasks", str(r["config"]["test_tasks"])])
    assert r["head_body"]["MAML training / MAML head"][0] == pytest.approx(own["test"]["accuracy"], abs=1e-9)
    assert set(r["test"]) == {"nil", "anil_head", "nil_minus_head", "maml_head", "anil_minus_maml"}


def test_same_seed_same_numbers(omniglot_dir):
    args = ["--data-dir", str(omniglot_dir), *TINY]
    a, b = nil.main(args + ["--seed", "5"]), nil.main(args + ["--seed", "5"])
    assert a["test"] == b["test"]


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "sinusoid"], "NIL classifies"),
    (["--head-iterations", "0"], "--head-iterations 0: must be at least 1"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_errors_are_clear(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        nil.main(argv)
    assert message in str(e.value) + capsys.readouterr().err
