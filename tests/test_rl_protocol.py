"""The meta-RL test protocol of the headline table, on every CPU (no recording of one CPU's rounding):
A.2's step sizes at test time (α, then α/2) and the model that is tested (the best validated one,
or the last with --last). Each check has a control that a wrong protocol fails."""

import numpy as np
import torch
from types import SimpleNamespace

import maml
import rl

NAV = ["--env", "navigation2d", "--iterations", "4", "--meta-batch-size", "3", "--episodes", "3",
       "--horizon", "10", "--test-tasks", "2", "--val-tasks", "2", "--val-every", "1", "--eval-steps", "3",
       "--device", "cpu"]


def test_the_test_steps_are_alpha_then_half_alpha():
    seen = []

    def spy(params, episodes, lr, first_order):
        seen.append((lr, first_order))
        return params
    envs = rl.make_vector_env("navigation2d", 4, 10)
    cfg = SimpleNamespace(env="navigation2d", horizon=10, gamma=0.99, gae_lambda=1.0, inner_lr=0.1, compare=None)
    params = rl.init_policy(2, 2, torch.Generator().manual_seed(0))
    curve = rl.adaptation_returns(params, spy, envs, cfg, 2, 0, 3, torch.device("cpu"), 2)
    assert curve.shape == (4, 2)
    assert seen == [(0.1, True), (0.05, True), (0.05, True)]     # A.2: α for the first step, α/2 after


def run_and_spy(monkeypatch, tmp_path, extra):
    """maml.main on navigation; returns the results, the checkpoint and the parameters the test used."""
    tested = []
    real = rl.adaptation_returns

    def spy(params, inner_adapt, envs, cfg, n_tasks, seed, *rest):
        tested.append((seed, {k: v.detach().clone() for k, v in params.items()}))
        return real(params, inner_adapt, envs, cfg, n_tasks, seed, *rest)
    monkeypatch.setattr(rl, "adaptation_returns", spy)
    ckpt = tmp_path / f"nav{len(extra)}.pt"
    r = maml.main(NAV + extra + ["--save", str(ckpt)])
    seed, params = tested[-1]
    assert seed == r["config"]["seed"] + 2                 # the last call is the test, on the test goals
    return r, torch.load(ckpt, weights_only=True), params


def test_the_best_validated_model_is_tested_and_last_tests_the_last(monkeypatch, tmp_path):
    r, state, tested = run_and_spy(monkeypatch, tmp_path, [])
    scores = [line["val_return_after"] for line in r["history"]]
    best_iteration = r["history"][int(np.argmax(scores))]["iteration"]
    assert r["best_iteration"] == best_iteration == state["best"]["iteration"]
    assert best_iteration != r["iteration"], "the control needs a run whose best iteration is not the last"
    assert all(torch.equal(tested[k], state["best"]["params"][k]) for k in tested)
    assert not all(torch.equal(tested[k], state["params"][k]) for k in tested)
    # the control: --last tests the last iterate, which is not the best one here
    r_last, state_last, tested_last = run_and_spy(monkeypatch, tmp_path, ["--last"])
    assert all(torch.equal(tested_last[k], state_last["params"][k]) for k in tested_last)
    assert r_last["test"] != r["test"]
