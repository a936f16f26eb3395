"""The meta-RL test protocol of the headline table, on every CPU (no recording of one CPU's rounding):
A.2's step sizes at test time (α, then α/2) and the model that is tested (the best validated one,
or the last with --snapshot last). Each check has a control that a wrong protocol fails."""

import numpy as np
import pytest
import torch
from types import SimpleNamespace

import maml
import rl

NAV = ["--env", "navigation2d", "--iterations", "4", "--meta-batch-size", "3", "--episodes", "3",
       "--horizon", "10", "--test-tasks", "2", "--val-tasks", "2", "--val-every", "1", "--eval-steps", "3",
       "--device", "cpu", "--protocol", "a2"]   # A.2: a given --protocol authors later on the line wins


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
    # the control: --snapshot last tests the last iterate, which is not the best one here
    r_last, state_last, tested_last = run_and_spy(monkeypatch, tmp_path, ["--snapshot", "last"])
    assert all(torch.equal(tested_last[k], state_last["params"][k]) for k in tested_last)
    assert r_last["test"] != r["test"]


def parse(argv, algorithm="maml"):
    return rl.finalize_config(rl.build_parser("t", algorithm).parse_args(argv), algorithm)


def test_the_two_protocols_fill_the_unset_flags_and_a_given_flag_wins():
    # the default: the authors' protocol where their results are stored (STYLE 21), A.2 elsewhere
    assert parse(["--env", "navigation2d"]).protocol == parse(["--env", "halfcheetah-dir"]).protocol == "authors"
    assert parse(["--env", "ant-dir"]).protocol == "a2"
    assert parse(["--env", "navigation2d"]).inner_lr == 0.5
    a2 = parse(["--env", "navigation2d", "--protocol", "a2"])
    assert (a2.inner_lr, a2.iterations, a2.meta_batch_size, a2.snapshot, a2.pretrain_adam_lr) == (0.1, 500, 20, "best", None)
    authors = parse(["--env", "navigation2d", "--protocol", "authors"])
    assert (authors.inner_lr, authors.iterations, authors.meta_batch_size, authors.snapshot) == (0.5, 100, 20, "last")
    assert parse(["--env", "navigation2d", "--protocol", "authors", "--compare", "pretrained"]).pretrain_adam_lr == 1e-3
    oracle = parse(["--env", "navigation2d", "--protocol", "authors", "--compare", "oracle"])
    assert (oracle.meta_batch_size, oracle.episodes) == (10, 1)          # trpo_point.py: 1000 steps a batch
    cheetah = parse(["--env", "halfcheetah-dir", "--protocol", "authors", "--compare", "pretrained"])
    assert (cheetah.inner_lr, cheetah.max_kl, cheetah.meta_batch_size, cheetah.eval_episodes) == (0.2, 0.01, 5, 20)
    maml_cheetah = parse(["--env", "halfcheetah-dir", "--protocol", "authors"])
    assert (maml_cheetah.inner_lr, maml_cheetah.max_kl, maml_cheetah.meta_batch_size) == (0.1, 0.02, 40)
    assert parse(["--env", "navigation2d", "--protocol", "authors"], "anil").meta_batch_size == 40   # ANIL App. E.5
    assert parse(["--env", "navigation2d", "--protocol", "authors", "--compare", "oracle"], "anil").meta_batch_size == 10
    given = parse(["--env", "navigation2d", "--protocol", "authors", "--inner-lr", "0.3", "--snapshot", "best"])
    assert (given.inner_lr, given.snapshot) == (0.3, "best")
    try:
        parse(["--env", "ant-dir", "--protocol", "authors"])
        raise AssertionError("ant-dir has no authors' protocol here")
    except SystemExit as e:
        assert "navigation2d and halfcheetah-dir" in str(e)


def test_the_authors_test_goals_are_their_np_random_seed_1_draws():
    goals = rl.authors_test_tasks("navigation2d")
    assert len(goals) == 40 and len({g["goal"] for g in goals}) == 40
    # np.random.seed(1); np.random.uniform() is 0.417022004702574, the first of the draws the test script printed
    assert abs(goals[0]["goal"][0] - (0.417022004702574 - 0.5)) < 1e-12
    directions = [t["direction"] for t in rl.authors_test_tasks("halfcheetah-dir")]
    assert directions[0] == -1.0 and set(directions) == {-1.0, 1.0}    # 2·0.417 < 1: backward


def test_the_authors_protocol_tests_the_last_iterate_on_their_goals_with_the_given_steps(monkeypatch, tmp_path):
    seen = []
    real = rl.adaptation_returns

    def spy(params, inner_adapt, envs, cfg, n_tasks, seed, steps, device, episodes, tasks=None, record=None):
        seen.append(tasks)
        return real(params, inner_adapt, envs, cfg, n_tasks, seed, steps, device, episodes, tasks, record)
    monkeypatch.setattr(rl, "adaptation_returns", spy)
    r = maml.main(NAV + ["--protocol", "authors", "--test-lrs", "0.4", "0.1", "0.05", "--save", str(tmp_path / "a.pt")])
    assert seen[-1] == rl.authors_test_tasks("navigation2d", 2) and "best_iteration" not in r
    assert len(r["test"]["log_std_by_step"]) == len(r["test"]["episode_length_by_step"]) == 4
    state = torch.load(tmp_path / "a.pt", weights_only=True)
    assert state["best"]["iteration"] != state["iteration"]   # so that testing the best would differ


def test_the_authors_pretrained_policy_takes_adam_steps_not_trpo_steps(tmp_path):
    """Adam's first step moves every parameter whose gradient is not ~0 by its learning rate (m/√v = ±1);
    the authors' pretrained policy (use_maml=False) takes one such step per iteration. The control, the
    A.2 pretrained policy, takes a TRPO step, whose sizes differ from parameter to parameter."""
    def first_step(extra):
        r = maml.main(NAV + ["--iterations", "1", "--val-every", "1", "--compare", "pretrained",
                             "--save", str(tmp_path / "p.pt")] + extra)
        after = torch.load(tmp_path / "p.pt", weights_only=True)["params"]
        before = rl.init_policy(2, 2, torch.Generator().manual_seed(r["config"]["seed"]))
        return torch.cat([(after[k] - before[k]).abs().flatten() for k in before])
    moved = first_step(["--protocol", "authors"])
    moved = moved[moved > 0]
    # |m/(√v + ε)| = |g|/(|g| + 1e-8) ≤ 1: exactly lr unless the gradient is as small as Adam's ε
    assert len(moved) > 100 and moved.max() <= 1e-3 * (1 + 1e-4)
    assert (moved - 1e-3).abs().lt(1e-6).float().mean() > 0.9
    trpo = first_step([])
    trpo = trpo[trpo > 0]
    assert trpo.max() / trpo.min() > 10


def test_a_step_budget_keeps_whole_episodes_until_each_task_has_its_steps():
    """rllab's whole_paths batches: episodes in order until the task has min_steps steps. A policy that
    stands still ends every episode of a goal within 0.01 of the start after 1 step, and none of a far goal:
    with 10 steps, 3 episodes a round and H = 5, the near goal counts 10 episodes (4 rounds drawn) and the
    far one 2 (0 and 5 steps before them; 10 before the third)."""
    params = rl.init_policy(2, 2, torch.Generator().manual_seed(0))
    params["fc3.w"].zero_()
    params["fc3.b"].zero_()
    params["log_std"].fill_(-20.0)
    tasks = [{"goal": (0.005, 0.005)}, {"goal": (0.4, 0.4)}]
    envs = rl.make_vector_env("navigation2d", 6, 5)
    ep = rl.sample_steps(envs, rl.per_task(params, 2), tasks, 3, 5, torch.Generator().manual_seed(0), min_steps=10)
    lengths = ep.mask.sum(-1)
    assert ep.mask.shape[1] == 12                                        # 4 rounds of 3
    assert lengths[0].tolist() == [1.0] * 10 + [0.0] * 2
    assert lengths[1].tolist() == [5.0, 5.0] + [0.0] * 10
    near, far = -(0.005 ** 2 * 2) ** 0.5, -5 * (0.4 ** 2 * 2) ** 0.5
    assert torch.allclose(ep.mean_return(), torch.tensor([near, far]), atol=1e-4)   # the dropped ones do not count
    assert rl.sample_steps(envs, rl.per_task(params, 2), tasks, 3, 5, torch.Generator().manual_seed(0)).mask.shape[1] == 3


def test_only_the_tasks_short_of_their_steps_draw_more_episodes(monkeypatch):
    """rllab samples each task until it has its steps: the near goal of the test above needs 4 rounds, the
    far one 1, so the rounds after the first hold the near goal alone (before the fix every task was drawn
    again, and a task at one step from its goal made all of them 1773 episodes long: out of memory)."""
    drawn = []
    real = rl.sample

    def spy(envs, params, tasks, *rest):
        drawn.append([t["goal"] for t in tasks])
        return real(envs, params, tasks, *rest)
    monkeypatch.setattr(rl, "sample", spy)
    params = rl.init_policy(2, 2, torch.Generator().manual_seed(0))
    params["fc3.w"].zero_()
    params["fc3.b"].zero_()
    params["log_std"].fill_(-20.0)
    near, far = (0.005, 0.005), (0.4, 0.4)
    ep = rl.sample_steps(rl.make_vector_env("navigation2d", 6, 5), rl.per_task(params, 2),
                         [{"goal": near}, {"goal": far}], 3, 5, torch.Generator().manual_seed(0), min_steps=10)
    assert drawn == [[near, far], [near], [near], [near]]
    assert ep.mask.sum(-1)[1].tolist() == [5.0, 5.0] + [0.0] * 10


def padded_batch():
    """A batch of two tasks with episodes of 1 to 5 steps (5 and 10 steps in all), advantages computed."""
    g = torch.Generator().manual_seed(0)
    T, E, H = 2, 6, 5
    lengths = torch.tensor([[1, 1, 1, 1, 1, 0], [5, 3, 2, 0, 0, 0]])
    mask = (torch.arange(H) < lengths.unsqueeze(-1)).float()
    ep = rl.Episodes(torch.randn(T, E, H, 2, generator=g) * mask.unsqueeze(-1), torch.randn(T, E, H, 2, generator=g),
                     torch.randn(T, E, H, generator=g) * mask, mask, torch.randn(T, E, H, generator=g) * mask)
    return rl.compute_advantages(ep, 0.99, 1.0)


def test_packing_keeps_each_tasks_valid_steps_in_order_and_the_losses():
    ep = padded_batch()
    packed = rl.pack_steps(ep)
    assert packed.mask.shape == (2, 1, 10)                            # the most steps any task has: 5 and 10
    assert packed.mask.sum(-1).flatten().tolist() == [5.0, 10.0]
    for t in range(2):
        valid = ep.mask[t] > 0
        n = int(valid.sum())
        assert torch.equal(packed.obs[t, 0, :n], ep.obs[t][valid])    # E·H order: episode by episode
        assert torch.equal(packed.advantages[t, 0, :n], ep.advantages[t][valid])
        assert packed.mask[t, 0, n:].sum() == 0
    params = rl.per_task(rl.init_policy(2, 2, torch.Generator().manual_seed(1)), 2)
    for loss in (lambda e: rl.reinforce_loss(rl.policy_forward(params, rl.flat_obs(e)), e),
                 lambda e: rl.surrogate_and_kl(params, e, tuple(d + 0.1 for d in rl.policy_forward(
                     params, rl.flat_obs(e))))[1]):
        torch.testing.assert_close(loss(packed), loss(ep), rtol=1e-6, atol=1e-7)
    # a full batch (HalfCheetah's: no episode ends early) is the same tensors in the same order
    full = rl.compute_advantages(rl.Episodes(ep.obs, ep.actions, ep.rewards, torch.ones_like(ep.mask), ep.log_prob), 0.99, 1.0)
    f, p = full.obs.flatten(1, 2), rl.pack_steps(full)
    assert torch.equal(rl.flat_obs(p), f)
    assert torch.equal(rl.reinforce_loss(rl.policy_forward(params, f), p),
                       rl.reinforce_loss(rl.policy_forward(params, f), full))


def test_the_authors_protocol_trains_on_packed_batches(monkeypatch):
    """meta_iteration with a step budget hands the inner loop and TRPO each task's steps as one row."""
    shapes = []

    def inner(params, episodes, lr, first_order):
        shapes.append(tuple(episodes.mask.shape))
        return params
    cfg = SimpleNamespace(episodes=3, horizon=8, sampling="steps", gamma=0.99, gae_lambda=1.0, inner_lr=0.1,
                          first_order=True, max_kl=0.01, cg_iters=3, cg_damping=1e-5, ls_steps=3, ls_ratio=0.8,
                          hvp="gauss-newton", compare=None)
    tasks = rl.Navigation2DVectorEnv.sample_tasks(2, np.random.default_rng(0))
    init = rl.init_policy(2, 2, torch.Generator().manual_seed(0))
    params = {k: v.clone().requires_grad_() for k, v in init.items()}
    info = rl.meta_iteration(params, inner, rl.make_vector_env("navigation2d", 6, 8), tasks, cfg,
                             torch.Generator().manual_seed(3), torch.device("cpu"))
    assert shapes and all(s[1] == 1 and s[2] >= 24 for s in shapes)   # (T, 1, S), S ≥ K·H
    # the return per episode comes from the batch before packing (one row would sum all its episodes)
    d_i = rl.sample_steps(rl.make_vector_env("navigation2d", 6, 8), rl.per_task(init, 2), tasks, 3, 8,
                          torch.Generator().manual_seed(3), min_steps=24)
    assert info["return_before"] == pytest.approx(d_i.mean_return().mean().item(), rel=1e-6)


def test_a_checkpoint_keeps_its_protocol_and_one_from_before_the_flag_is_a2(tmp_path):
    """--load takes the protocol the checkpoint was trained with; a checkpoint saved before --protocol
    existed (no such key) was trained with A.2, not with today's default for navigation2d."""
    ckpt = tmp_path / "a2.pt"
    maml.main(NAV + ["--iterations", "1", "--save", str(ckpt)])
    assert maml.main(["--env", "navigation2d", "--load", str(ckpt), "--eval-only"])["config"]["protocol"] == "a2"
    state = torch.load(ckpt, weights_only=False)
    del state["config"]["protocol"]
    torch.save(state, ckpt)
    r = maml.main(["--env", "navigation2d", "--load", str(ckpt), "--eval-only"])
    assert (r["config"]["protocol"], r["config"]["snapshot"], r["config"]["sampling"]) == ("a2", "best", "episodes")
