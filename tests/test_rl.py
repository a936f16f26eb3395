"""rl.py: the equations of the meta-RL plumbing (conjugate gradient, Hessian-vector products, KL,
baseline, GAE, policy gradient, TRPO), the task rewards against gymnasium's own quantities, and
a tiny meta-iteration of every environment and algorithm."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

import anil
import maml
import rl


def flat_to_params(vector, like):
    out, offset = {}, 0
    for k, v in like.items():
        out[k] = vector[offset:offset + v.numel()].view_as(v)
        offset += v.numel()
    return out


def tiny_episodes(T=2, K=3, H=4, obs_dim=3, act_dim=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(T, K, H, dtype=dtype)
    mask[0, 1, 2:] = 0                                   # an episode that ended after 2 steps
    ep = rl.Episodes(obs=torch.randn(T, K, H, obs_dim, generator=g, dtype=dtype),
                     actions=torch.randn(T, K, H, act_dim, generator=g, dtype=dtype),
                     rewards=torch.randn(T, K, H, generator=g, dtype=dtype) * mask, mask=mask,
                     log_prob=torch.randn(T, K, H, generator=g, dtype=dtype) * 0.1)
    ep.advantages = torch.randn(T, K, H, generator=g, dtype=dtype) * mask
    return ep


def tiny_policy(obs_dim=3, act_dim=2, seed=0):
    p = rl.init_policy(obs_dim, act_dim, torch.Generator().manual_seed(seed), hidden=(5, 4))
    p["log_std"] = torch.tensor([-0.3, 0.2])
    return {k: v.double() for k, v in p.items()}


# ---------------------------------------------------------------------------------------------
# Linear algebra and the policy's distribution
# ---------------------------------------------------------------------------------------------

def test_conjugate_gradient_solves_spd_systems():
    g = torch.Generator().manual_seed(0)
    for n in (3, 8):
        q = torch.randn(n, n, generator=g, dtype=torch.float64)
        A = q @ q.T + 0.5 * torch.eye(n, dtype=torch.float64)
        b = torch.randn(n, generator=g, dtype=torch.float64)
        x, ax = rl.conjugate_gradient(lambda v: A @ v, b, iters=n, tol=1e-30)
        assert torch.allclose(A @ x, b, atol=1e-8)
        assert torch.allclose(x, torch.linalg.solve(A, b), atol=1e-8)
        assert torch.allclose(ax, A @ x, atol=1e-10)
    # too few iterations on an ill-conditioned system leaves a residual: the test can fail;
    # the returned A x is still A times the returned x (trpo_step's xᵀA x relies on it)
    A = torch.diag(torch.logspace(0, 4, 8, dtype=torch.float64))
    x, ax = rl.conjugate_gradient(lambda v: A @ v, torch.ones(8, dtype=torch.float64), iters=2)
    assert (A @ x - 1).abs().max() > 1e-3
    assert torch.allclose(ax, A @ x, rtol=1e-10, atol=1e-10)


def test_gaussian_kl_is_zero_at_identical_parameters_and_matches_the_closed_form():
    g = torch.Generator().manual_seed(1)
    m0, m1 = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    s0, s1 = torch.randn(2, 3, generator=g) * 0.5, torch.randn(2, 3, generator=g) * 0.5
    assert rl.gaussian_kl((m0, s0), (m0, s0)).abs().max() < 1e-6
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m0, s0.exp().unsqueeze(1)),
                                            torch.distributions.Normal(m1, s1.exp().unsqueeze(1))).sum(-1)
    assert torch.allclose(rl.gaussian_kl((m0, s0), (m1, s1)), ref, atol=1e-5)
    a = torch.randn(2, 5, 3, generator=g)
    ref_lp = torch.distributions.Normal(m0, s0.exp().unsqueeze(1)).log_prob(a).sum(-1)
    assert torch.allclose(rl.gaussian_log_prob((m0, s0), a), ref_lp, atol=1e-5)


def kl_of_adapted_policy(inner_adapt, first_order):
    """KL(θ) between the adapted policies at θ0 and θ on tiny episodes, as meta_iteration builds it."""
    theta0 = tiny_policy()
    train_eps, valid_eps = tiny_episodes(seed=1), tiny_episodes(seed=2)
    T = train_eps.obs.shape[0]

    def adapted(p, create_graph):
        p = maml.per_task(p, T)
        return inner_adapt(p, train_eps, 0.5, first_order=first_order or not create_graph)

    old = tuple(d.detach() for d in rl.policy_forward(
        {k: v.detach() for k, v in adapted({k: v.clone().requires_grad_() for k, v in theta0.items()}, False).items()},
        rl.flat_obs(valid_eps)))

    def kl_and_dist(p, create_graph=True):
        loss, kl, dist = rl.surrogate_and_kl(adapted(p, create_graph), valid_eps, old)
        return loss, kl, dist, valid_eps.mask.flatten(1)
    return theta0, kl_and_dist


@pytest.mark.parametrize("inner_adapt", [maml.adapt_policy, anil.adapt_policy], ids=["maml", "anil"])
@pytest.mark.parametrize("first_order", [False, True])
def test_hessian_vector_products_equal_the_explicit_hessian(inner_adapt, first_order):
    theta0, kl_and_dist = kl_of_adapted_policy(inner_adapt, first_order)
    flat0 = rl.flat(theta0.values())

    def kl_of_flat(vector):
        return kl_and_dist(flat_to_params(vector, theta0))[1]
    H = torch.autograd.functional.hessian(kl_of_flat, flat0)          # explicit, (n, n)
    v = torch.randn(flat0.numel(), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    params = {k: t.clone().requires_grad_() for k, t in theta0.items()}
    tensors = list(params.values())
    _, kl, dist, mask = kl_and_dist(params)
    assert abs(kl.item()) < 1e-12                                     # identical policies at θ0
    exact = rl.hessian_vector_product(kl, tensors)(v)
    gauss_newton = rl.kl_hessian_vector_product(dist, mask, tensors)(v)
    assert torch.allclose(exact, H @ v, rtol=1e-6, atol=1e-9)
    assert torch.allclose(gauss_newton, H @ v, rtol=1e-6, atol=1e-9)
    # damping adds damping·v
    assert torch.allclose(rl.kl_hessian_vector_product(dist, mask, tensors, 0.1)(v), H @ v + 0.1 * v, atol=1e-8)


def test_double_backprop_hvp_of_the_surrogate_matches_finite_differences_of_its_gradient():
    """The surrogate is not at a stationary point, so here the third-derivative terms through the
    inner step matter: the plain double-backprop product must capture them."""
    theta0, kl_and_dist = kl_of_adapted_policy(maml.adapt_policy, first_order=False)
    v = {k: torch.randn(t.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
         for k, t in theta0.items()}

    def grad_at(p):
        p = {k: t.clone().requires_grad_() for k, t in p.items()}
        return rl.flat(torch.autograd.grad(kl_and_dist(p)[0], list(p.values())))
    eps = 1e-5
    fd = (grad_at({k: t + eps * v[k] for k, t in theta0.items()})
          - grad_at({k: t - eps * v[k] for k, t in theta0.items()})) / (2 * eps)
    params = {k: t.clone().requires_grad_() for k, t in theta0.items()}
    hv = rl.hessian_vector_product(kl_and_dist(params)[0], list(params.values()))(rl.flat(v.values()))
    assert torch.allclose(hv, fd, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------

def test_linear_baseline_recovers_a_linear_target_and_ignores_masked_steps():
    g = torch.Generator().manual_seed(5)
    T, K, H, d = 2, 4, 30, 3
    obs = torch.randn(T, K, H, d, generator=g)
    mask = torch.ones(T, K, H)
    mask[:, 0, 20:] = 0
    mask[1, 2, 5:] = 0
    w = torch.randn(T, 2 * d + 4, generator=g)
    feats = rl.baseline_features(obs, torch.ones_like(mask)).reshape(T, K, H, -1)
    target = (feats * w[:, None, None]).sum(-1)
    # garbage on the masked steps, in the returns and the observations, must not matter
    garbage = torch.where(mask.bool(), target, torch.full_like(target, 1e6))
    obs_garbage = torch.where(mask.bool().unsqueeze(-1), obs, torch.full_like(obs, 1e3))
    values = rl.fit_baseline(obs_garbage, garbage, mask)
    assert torch.allclose(values * mask, target * mask, atol=1e-3)
    assert (values[mask == 0] == 0).all()
    # a target outside the features' span is not fitted exactly: the check above can fail
    bad = rl.fit_baseline(obs, target + torch.sin(7 * obs[..., 0]) * 5, mask)
    assert ((bad - target) * mask).abs().max() > 0.5


def test_baseline_features_are_duan_et_al():
    obs = torch.tensor([[[[2.0], [-20.0]]]])        # (1, 1, 2, 1)
    f = rl.baseline_features(obs, torch.ones(1, 1, 2))
    t = 0.01
    assert torch.allclose(f[0, 1], torch.tensor([-10.0, 100.0, t, t ** 2, t ** 3, 1.0]))   # clipped to ±10
    assert torch.allclose(f[0, 0], torch.tensor([2.0, 4.0, 0.0, 0.0, 0.0, 1.0]))


def test_gae_with_lambda_one_is_the_discounted_return_minus_the_baseline():
    g = torch.Generator().manual_seed(6)
    T, K, H, gamma = 2, 3, 12, 0.9
    mask = torch.ones(T, K, H)
    mask[0, 0, 7:] = 0
    mask[1, 2, 1:] = 0
    rewards = torch.randn(T, K, H, generator=g) * mask
    values = torch.randn(T, K, H, generator=g) * mask
    returns = torch.zeros(T, K, H)                  # by the definition, one episode at a time
    for i in range(T):
        for j in range(K):
            n = int(mask[i, j].sum())
            for t in range(n):
                returns[i, j, t] = sum(gamma ** (u - t) * rewards[i, j, u] for u in range(t, n))
    assert torch.allclose(rl.gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0), returns, atol=1e-5)
    assert torch.allclose(rl.gae(rewards, values, mask, gamma, 1.0), (returns - values) * mask, atol=1e-5)
    # λ = 0: the one-step TD error
    next_v = torch.cat([values[..., 1:] * mask[..., 1:], torch.zeros(T, K, 1)], -1)
    assert torch.allclose(rl.gae(rewards, values, mask, gamma, 0.0), (rewards + gamma * next_v - values) * mask, atol=1e-6)


def test_advantages_are_normalized_per_task_over_valid_steps():
    ep = tiny_episodes(T=3, K=4, H=6, dtype=torch.float32)
    rl.compute_advantages(ep, 0.99, 1.0)
    for i in range(3):
        a = ep.advantages[i][ep.mask[i] > 0]
        assert abs(a.mean().item()) < 1e-5 and abs(a.std(unbiased=False).item() - 1) < 1e-3
    assert (ep.advantages[ep.mask == 0] == 0).all()


def test_policy_gradient_matches_the_analytic_gradient_of_a_gaussian_bandit():
    """One step, reward r(a) = −|a − c|²: J(μ, σ) = −|μ − c|² − Σσ², so ∇μ J = −2(μ − c) and
    ∇log σ J = −2σ². The REINFORCE loss's gradient must be −∇J within the Monte-Carlo error."""
    g = torch.Generator().manual_seed(7)
    N, c = 200_000, torch.tensor([0.5, -1.0])
    mu, log_std = torch.tensor([0.2, 0.3], requires_grad=True), torch.tensor([-0.5, 0.1], requires_grad=True)
    with torch.no_grad():
        a = mu + log_std.exp() * torch.randn(N, 2, generator=g)
        r = -((a - c) ** 2).sum(-1)
    ep = rl.Episodes(obs=torch.zeros(1, N, 1, 1), actions=a.reshape(1, N, 1, 2), rewards=r.reshape(1, N, 1),
                     mask=torch.ones(1, N, 1), log_prob=torch.zeros(1, N, 1))
    ep.advantages = (r - r.mean()).reshape(1, N, 1)       # a constant baseline leaves the gradient unbiased
    dist = (mu.expand(1, N, 2), log_std.expand(1, 2))
    grads = torch.autograd.grad(rl.reinforce_loss(dist, ep).sum(), (mu, log_std))
    analytic = (2 * (mu - c), 2 * (2 * log_std).exp())    # −∇J
    # per-sample gradient terms, for the Monte-Carlo standard error
    with torch.no_grad():
        z = (a - mu) / log_std.exp()
        terms = (-(z / log_std.exp()) * ep.advantages.reshape(N, 1), -(z ** 2 - 1) * ep.advantages.reshape(N, 1))
    for est, ref, term in zip(grads, analytic, terms):
        se = term.std(0) / math.sqrt(N)
        assert ((est - ref).abs() < 4 * se + 1e-3).all(), (est, ref, se)
    # and a wrong sign would be far outside: the check can fail
    assert ((grads[0] + analytic[0]).abs() > 10 * terms[0].std(0) / math.sqrt(N)).all()


# ---------------------------------------------------------------------------------------------
# TRPO
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hvp_mode", ["gauss-newton", "double-backprop"])
def test_trpo_step_improves_the_surrogate_and_keeps_the_kl_bound(hvp_mode):
    """A Gaussian 'policy' without observations on a fixed batch from the old policy, with the
    advantage favouring large actions."""
    g = torch.Generator().manual_seed(8)
    N, max_kl = 4000, 0.01
    params = {"mean": torch.zeros(2, requires_grad=True), "log_std": torch.zeros(2, requires_grad=True)}
    with torch.no_grad():
        a = torch.randn(1, N, 2, generator=g)
    old = (torch.zeros(1, N, 2), torch.zeros(1, 2))
    old_logp = rl.gaussian_log_prob(old, a)
    adv = a.sum(-1) - a.sum(-1).mean()
    mask = torch.ones(1, N)

    def objective(p, create_graph):
        dist = (p["mean"].expand(1, N, 2), p["log_std"].expand(1, 2))
        ratio = (rl.gaussian_log_prob(dist, a) - old_logp).exp()
        return -(ratio * adv).mean(), rl.gaussian_kl(old, dist).mean(), dist, mask
    before = objective(params, True)[0].item()
    info = rl.trpo_step(params, objective, max_kl, 10, 1e-5, 15, 0.8, hvp_mode)
    after, kl = objective(params, False)[:2]
    assert info["accepted"] and after.item() < before and kl.item() <= max_kl
    assert kl.item() > 0.3 * max_kl                        # a real step, not a vanishing one
    assert params["mean"].detach().min() > 0               # toward the actions with positive advantage


def test_trpo_step_keeps_theta_when_no_step_improves():
    """The loss falls along +mean[0] but curves up so fast that every step of the line search,
    down to 0.8^14 of the full one, overshoots: nothing is accepted and θ is restored."""
    N = 10
    params = {"mean": torch.zeros(2, requires_grad=True), "log_std": torch.zeros(2, requires_grad=True)}
    mask = torch.ones(1, N)

    def objective(p, create_graph):
        dist = (p["mean"].expand(1, N, 2), p["log_std"].expand(1, 2))
        kl = rl.gaussian_kl((torch.zeros(1, N, 2), torch.zeros(1, 2)), dist).mean()
        return -p["mean"][0] + 1e4 * p["mean"][0] ** 2, kl, dist, mask
    info = rl.trpo_step(params, objective, 0.01, 10, 1e-5, 15, 0.8)
    assert not info["accepted"] and info["ls_step"] == 15
    assert (params["mean"] == 0).all() and (params["log_std"] == 0).all()


# ---------------------------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------------------------

def test_navigation2d_dynamics_clipping_reward_and_termination():
    env = rl.Navigation2DVectorEnv(3, horizon=4)
    env.set_attr("task", [{"goal": (0.05, 0.0)}, {"goal": (-0.3, 0.4)}, {"goal": (0.2, 0.2)}])
    obs, _ = env.reset(seed=[1, 2, 3])
    assert np.allclose(obs, 0)
    obs, r, term, trunc, _ = env.step(np.array([[0.5, 0.0], [-5.0, 5.0], [0.2, -0.1]]))
    assert np.array_equal(obs, np.clip(0.1 * np.array([[0.5, 0.0], [-5.0, 5.0], [0.2, -0.1]]), -0.1, 0.1)
                          .astype(np.float32))                                  # clip(0.1·a), as maml_rl
    assert np.allclose(obs, [[0.05, 0.0], [-0.1, 0.1], [0.02, -0.01]])
    assert np.allclose(r, -np.linalg.norm(obs - env.goals, axis=1))
    assert term.tolist() == [True, False, False] and not trunc.any()
    for _ in range(3):
        obs, r, term, trunc, _ = env.step(np.zeros((3, 2)))
    assert trunc.all()                                                          # horizon 4
    # within 0.01 on one coordinate only is not the goal
    env.set_attr("task", {"goal": (0.1, 0.05)})
    env.reset()
    assert not env.step(np.array([[1.0, 0.0]] * 3))[2].any()
    assert env.step(np.array([[0.0, 0.45]] * 3))[2].all()


def test_sampler_masks_steps_after_an_episode_ends_and_is_seeded():
    """A policy that steps exactly onto the goal ends every episode after one step."""
    env = rl.Navigation2DVectorEnv(4, horizon=10)
    p = rl.init_policy(2, 2, torch.Generator().manual_seed(0))
    p = {k: torch.zeros_like(v) for k, v in p.items()}
    p["fc3.b"] = torch.tensor([0.5, 0.0])                 # moves by 0.1·a = (0.05, 0)
    p["log_std"] = torch.full((2,), -30.0)
    tasks = [{"goal": (0.05, 0.0)}, {"goal": (0.5, 0.5)}]
    ep = rl.sample(env, maml.per_task(p, 2), tasks, 2, 10, torch.Generator().manual_seed(0))
    assert ep.obs.shape == (2, 2, 10, 2) and ep.mask.shape == (2, 2, 10)
    assert ep.mask[0].sum(-1).tolist() == [1, 1]           # reached the goal at step 1
    assert ep.mask[1].sum(-1).tolist() == [10, 10]         # never reaches (0.5, 0.5) moving along x
    assert torch.allclose(ep.returns(), (ep.rewards * ep.mask).sum(-1))
    # two rounds of one task each give the same episodes as one round of two tasks
    ep1 = rl.sample(rl.Navigation2DVectorEnv(2, 10), maml.per_task(p, 2), tasks, 2, 10, torch.Generator().manual_seed(0))
    assert torch.equal(ep.mask, ep1.mask) and torch.allclose(ep.rewards, ep1.rewards)
    # the noise comes from the generator: same seed, same actions; another seed, others
    q = dict(p, log_std=torch.zeros(2))
    a = rl.sample(env, maml.per_task(q, 2), tasks, 2, 10, torch.Generator().manual_seed(1)).actions
    b = rl.sample(env, maml.per_task(q, 2), tasks, 2, 10, torch.Generator().manual_seed(1)).actions
    c = rl.sample(env, maml.per_task(q, 2), tasks, 2, 10, torch.Generator().manual_seed(2)).actions
    assert torch.equal(a, b) and not torch.equal(a, c)


def _step_and_check(name, task, check, steps=5):
    env = rl.LocomotionTask(name, 200)
    env.task = task
    env.reset(seed=0)
    raw = env.unwrapped
    rng = np.random.default_rng(0)

    def x():   # what gymnasium differentiates: the root joint (cheetah), the torso's position (ant)
        return raw.data.body("torso").xpos[0] if name.startswith("ant") else raw.data.qpos[0]
    infos = []
    for _ in range(steps):
        action = rng.uniform(-1.5, 1.5, env.action_space.shape)           # partly out of the box
        x_before = x()
        _, reward, terminated, _, info = env.step(action)
        applied = np.clip(action, -1, 1)
        assert np.allclose(raw.data.ctrl, applied)                        # MuJoCo got the clipped action
        assert math.isclose(info["x_velocity"], (x() - x_before) / raw.dt, rel_tol=1e-6, abs_tol=1e-9)
        assert math.isclose(reward, check(info["x_velocity"], applied, raw), rel_tol=1e-9, abs_tol=1e-9)
        infos.append(info)
        if terminated:
            break
    env.close()
    return infos


def test_halfcheetah_rewards_match_the_formulas():
    _step_and_check("halfcheetah-dir", {"direction": -1.0},
                    lambda v, a, raw: -v - 0.05 * np.square(a).sum())
    _step_and_check("halfcheetah-vel", {"velocity": 1.3},
                    lambda v, a, raw: -abs(v - 1.3) - 0.05 * np.square(a).sum())
    assert rl.LocomotionTask("halfcheetah-dir", 200).unwrapped.dt == pytest.approx(0.05)


def test_ant_rewards_match_the_formulas():
    def contact(raw):
        return 5e-4 * np.square(np.clip(raw.data.cfrc_ext, -1, 1)).sum()
    for name, task, reward in [
            ("ant-dir", {"direction": 1.0}, lambda v, a, raw: v - 0.005 * np.square(a).sum() - contact(raw) + 0.05),
            ("ant-vel", {"velocity": 2.0},
             lambda v, a, raw: -abs(v - 2.0) + 1.0 - 0.005 * np.square(a).sum() - contact(raw) + 0.05)]:
        infos = _step_and_check(name, task, reward, steps=60)
        assert any(i["reward_contact"] < 0 for i in infos)     # the contact term was exercised


def test_task_distributions():
    rng = np.random.default_rng(0)
    goals = np.array([t["goal"] for t in rl.Navigation2DVectorEnv.sample_tasks(2000, rng)])
    assert goals.min() >= -0.5 and goals.max() <= 0.5 and abs(goals.mean()) < 0.02
    assert {t["direction"] for t in rl.LOCOMOTION["halfcheetah-dir"].sample_tasks(100, rng)} == {-1.0, 1.0}
    v = [t["velocity"] for t in rl.LOCOMOTION["halfcheetah-vel"].sample_tasks(2000, rng)]
    assert 0 <= min(v) and max(v) <= 2 and abs(np.mean(v) - 1) < 0.05
    v = [t["velocity"] for t in rl.LOCOMOTION["ant-vel"].sample_tasks(2000, rng)]
    assert 0 <= min(v) and max(v) <= 3 and abs(np.mean(v) - 1.5) < 0.07


def test_sync_vector_env_takes_one_task_per_environment():
    envs = rl.make_vector_env("halfcheetah-vel", 3, 200)
    envs.set_attr("task", [{"velocity": 0.1}, {"velocity": 1.0}, {"velocity": 1.9}])
    assert [e.task["velocity"] for e in envs.envs] == [0.1, 1.0, 1.9]
    envs.close()


def test_anil_adapts_only_the_policy_head():
    theta = {k: v.clone().requires_grad_() for k, v in tiny_policy().items()}
    ep = tiny_episodes(seed=1)
    fast = anil.adapt_policy(maml.per_task(theta, 2), ep, 0.5, first_order=False)
    full = maml.adapt_policy(maml.per_task(theta, 2), ep, 0.5, first_order=False)
    for k in theta:
        same = torch.equal(fast[k], maml.per_task(theta, 2)[k])
        assert same == (k not in anil.POLICY_HEAD), k
        if k in anil.POLICY_HEAD:     # the head takes the same step as in MAML's full inner loop
            assert torch.allclose(fast[k], full[k])


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

TINY = ["--iterations", "1", "--meta-batch-size", "2", "--episodes", "2", "--horizon", "8", "--test-tasks", "2",
        "--val-tasks", "2", "--eval-steps", "1", "--device", "cpu"]


@pytest.mark.parametrize("script", ["maml.py", "anil.py"])
@pytest.mark.parametrize("env", sorted(rl.ENV_SETTINGS))
def test_one_tiny_meta_iteration_of_every_env_and_algorithm(script, env, tmp_path):
    extra = ["--vector", "async"] if (script, env) == ("maml.py", "halfcheetah-vel") else []
    p = subprocess.run([sys.executable, str(ROOT / script), "--env", env, *TINY, *extra,
                        "--out", str(tmp_path / "r.json")], check=False, cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "return_step0=" in p.stdout and "return_step1=" in p.stdout
    assert (tmp_path / "r.json").exists()


def test_same_seed_same_numbers_and_resume_continues_identically(tmp_path, capsys):
    args = ["--env", "navigation2d", "--meta-batch-size", "3", "--episodes", "3", "--horizon", "10",
            "--test-tasks", "2", "--val-tasks", "2", "--val-every", "1", "--eval-steps", "1", "--device", "cpu"]
    a = maml.main(args + ["--iterations", "2", "--save", str(tmp_path / "a.pt")])
    b = maml.main(args + ["--iterations", "2"])
    assert a["test"] == b["test"] and a["history"][-1]["val_return_after"] == b["history"][-1]["val_return_after"]
    maml.main(args + ["--iterations", "1", "--save", str(tmp_path / "c.pt")])
    c = maml.main(["--env", "navigation2d", "--resume", str(tmp_path / "c.pt"), "--iterations", "2",
                   "--save", str(tmp_path / "c.pt")])
    assert c["test"] == a["test"]
    sa, sc = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "c.pt")
    assert all(torch.equal(sa["params"][k], sc["params"][k]) for k in sa["params"])
    d = maml.main(["--env", "navigation2d", "--eval-only", "--load", str(tmp_path / "a.pt")])
    assert d["test"] == a["test"]
    capsys.readouterr()     # resuming a finished run trains nothing and tests the same model
    assert maml.main(["--env", "navigation2d", "--resume", str(tmp_path / "a.pt")])["test"] == a["test"]
    assert "already at iteration 2 of 2" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--env", "navigation2d", "--num-envs", "7", "--episodes", "2"], "multiple of --episodes"),
    (["--env", "navigation2d", "--eval-only"], "--eval-only needs --load"),
    (["--env", "cartpole"], "invalid choice"),
    (["--env", "navigation2d", "--inner-steps", "2"], "unrecognized arguments"),
    (["--env", "navigation2d", "--max-kl", "0"], "--max-kl 0.0: a step size must be positive"),
    (["--env", "navigation2d", "--plot-with", "maml.json"], "give --plot PATH too"),
])
def test_errors_are_clear(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        maml.main(argv)
    assert message in str(e.value) + capsys.readouterr().err


def test_wrong_checkpoints_are_refused(tmp_path):
    args = ["--env", "navigation2d", "--iterations", "1", "--meta-batch-size", "2", "--episodes", "2", "--horizon", "5",
            "--test-tasks", "2", "--val-tasks", "2", "--eval-steps", "0", "--save", str(tmp_path / "rl.pt")]
    maml.main(args)
    assert anil.main(args[:-2] + ["--eval-only", "--load", str(tmp_path / "rl.pt")])["test"]   # either script tests it
    with pytest.raises(SystemExit, match="meta-RL checkpoint: add --env navigation2d"):
        maml.main(["--eval-only", "--load", str(tmp_path / "rl.pt")])
    with pytest.raises(SystemExit, match="trained on navigation2d"):
        maml.main(["--env", "halfcheetah-dir", "--eval-only", "--load", str(tmp_path / "rl.pt")])
    with pytest.raises(SystemExit, match="written by maml.py; this takes anil.py"):
        anil.main(["--env", "navigation2d", "--resume", str(tmp_path / "rl.pt"), "--iterations", "2"])
    maml.main(["--iterations", "1", "--val-tasks", "2", "--test-tasks", "2", "--eval-steps", "1",
               "--save", str(tmp_path / "sinusoid.pt")])
    with pytest.raises(SystemExit, match="sinusoid.pt is a supervised checkpoint, not a meta-RL one"):
        maml.main(["--env", "navigation2d", "--eval-only", "--load", str(tmp_path / "sinusoid.pt")])
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="corrupt"):
        maml.main(["--env", "navigation2d", "--eval-only", "--load", str(tmp_path / "bad.pt")])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    args = ["--env", "navigation2d", "--meta-batch-size", "2", "--episodes", "2", "--horizon", "5",
            "--test-tasks", "2", "--val-tasks", "2", "--val-every", "1", "--eval-steps", "0",
            "--save", str(tmp_path / "run.pt")]
    maml.main(args + ["--iterations", "1"])
    good = torch.load(tmp_path / "run.pt")
    real = rl.surrogate_and_kl

    def poisoned(fast, ep, old_dist):
        loss, kl, dist = real(fast, ep, old_dist)
        return loss * float("nan"), kl, dist
    monkeypatch.setattr(rl, "surrogate_and_kl", poisoned)
    with pytest.raises(SystemExit, match="non-finite .* iteration 2.*last good checkpoint"):
        maml.main(["--env", "navigation2d", "--resume", str(tmp_path / "run.pt"), "--iterations", "3",
                   "--save", str(tmp_path / "run.pt")])
    kept = torch.load(tmp_path / "run.pt")
    assert kept["iteration"] == 1 and all(torch.equal(good["params"][k], kept["params"][k]) for k in good["params"])


def test_plot_draws_the_other_runs_curves(tmp_path):
    pytest.importorskip("matplotlib")
    args = ["--env", "navigation2d", "--iterations", "1", "--meta-batch-size", "2", "--episodes", "2", "--horizon", "5",
            "--test-tasks", "2", "--val-tasks", "2", "--eval-steps", "1"]
    maml.main(args + ["--out", str(tmp_path / "maml.json")])
    anil.main(args + ["--plot", str(tmp_path / "both.png"), "--plot-with", str(tmp_path / "maml.json")])
    assert (tmp_path / "both.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="not a halfcheetah-dir run"):
        anil.main(["--env", "halfcheetah-dir", "--iterations", "1", "--meta-batch-size", "1", "--episodes", "1",
                   "--horizon", "3", "--test-tasks", "1", "--val-tasks", "1", "--eval-steps", "0",
                   "--plot", str(tmp_path / "x.png"), "--plot-with", str(tmp_path / "maml.json")])


@pytest.mark.parametrize("plumbing", ["rl.py", "data.py"])
def test_the_plumbing_imports_no_algorithm_file(plumbing):
    """No import cycle: the algorithm files import rl.py and data.py, never the reverse."""
    import re
    source = (ROOT / plumbing).read_text()
    assert not re.search(r"^\s*(import|from)\s+(maml|anil|nil|reptile)\b", source, re.M)


def test_the_test_samples_eval_episodes_trajectories_per_step(monkeypatch):
    """§5.3: 'up to 4 gradient updates, each with 40 samples' at test time."""
    seen = []
    real = rl.sample

    def counting(envs, params, tasks, episodes, *args, **kw):
        seen.append(episodes)
        return real(envs, params, tasks, episodes, *args, **kw)
    monkeypatch.setattr(rl, "sample", counting)
    r = maml.main(["--env", "navigation2d", "--iterations", "1", "--meta-batch-size", "2", "--episodes", "2",
                   "--horizon", "5", "--test-tasks", "2", "--val-tasks", "2", "--eval-steps", "2", "--protocol", "a2"])
    assert r["config"]["eval_episodes"] == 40
    assert seen[-3:] == [40, 40, 40] and 40 not in seen[:-3]     # training and validation use K = 2


def test_the_oracle_observation_carries_the_task():
    env = rl.Navigation2DVectorEnv(4, horizon=3)
    params = rl.init_policy(4, 2, torch.Generator().manual_seed(0))
    tasks = [{"goal": (0.3, -0.2)}, {"goal": (-0.1, 0.4)}]
    ep = rl.sample(env, rl.per_task(params, 2), tasks, 2, 3, torch.Generator().manual_seed(0), oracle=True)
    assert ep.obs.shape == (2, 2, 3, 4)
    for t, task in enumerate(tasks):
        assert torch.equal(ep.obs[t, :, :, 2:], torch.tensor(task["goal"], dtype=torch.float32).expand(2, 3, 2))


def test_the_pretrained_meta_step_is_trpo_on_the_pooled_batch_without_an_inner_loop():
    """With no_inner_loop, meta_iteration's TRPO step equals trpo_step on the surrogate of the
    batch D_i itself, sampled by θ: the plain policy-gradient/TRPO baseline of Fig. 4/5."""
    from types import SimpleNamespace
    cfg = SimpleNamespace(episodes=3, horizon=8, sampling="episodes", gamma=0.99, gae_lambda=1.0, inner_lr=0.1, first_order=False,
                          max_kl=0.01, cg_iters=10, cg_damping=1e-5, ls_steps=15, ls_ratio=0.8,
                          hvp="gauss-newton", compare="pretrained")
    tasks = rl.Navigation2DVectorEnv.sample_tasks(2, np.random.default_rng(0))
    init = rl.init_policy(2, 2, torch.Generator().manual_seed(0))
    a = {k: v.clone().requires_grad_() for k, v in init.items()}
    rl.meta_iteration(a, rl.no_inner_loop, rl.make_vector_env("navigation2d", 6, 8), tasks, cfg,
                      torch.Generator().manual_seed(3), torch.device("cpu"))
    # by hand: the same episodes, TRPO on their surrogate at θ itself
    g = torch.Generator().manual_seed(3)
    ep = rl.compute_advantages(rl.sample(rl.make_vector_env("navigation2d", 6, 8), rl.per_task(init, 2), tasks, 3, 8, g),
                               0.99, 1.0)
    b = {k: v.clone().requires_grad_() for k, v in init.items()}
    with torch.no_grad():
        old = rl.policy_forward(rl.per_task(init, 2), rl.flat_obs(ep))

    def objective(p, create_graph):
        return (*rl.surrogate_and_kl(rl.per_task(p, 2), ep, old), ep.mask.flatten(1))
    rl.trpo_step(b, objective, 0.01, 10, 1e-5, 15, 0.8)
    for k in init:
        torch.testing.assert_close(a[k], b[k])
    assert any(not torch.equal(a[k], init[k]) for k in init)


@pytest.mark.parametrize("compare, fine_tuned", [("oracle", False), ("pretrained", True), ("random", True)])
def test_only_the_oracle_is_never_fine_tuned(compare, fine_tuned, monkeypatch):
    """§5.3: the baselines (a) pretrained and (b) random are fine-tuned at test time; the oracle,
    the upper bound, is not. Record the policy each evaluation step samples with."""
    policies = []
    real = rl.sample

    def recording(envs, params, *args, **kw):
        policies.append({k: v.clone() for k, v in params.items()})
        return real(envs, params, *args, **kw)
    monkeypatch.setattr(rl, "sample", recording)
    maml.main(["--env", "navigation2d", "--compare", compare, "--iterations", "1", "--meta-batch-size", "2",
               "--episodes", "2", "--horizon", "5", "--test-tasks", "2", "--val-tasks", "2", "--eval-steps", "2",
               "--eval-episodes", "2"])
    test = policies[-3:]   # steps 0, 1, 2 of the test curve
    changed = [any(not torch.equal(test[s][k], test[0][k]) for k in test[0]) for s in (1, 2)]
    assert changed == [fine_tuned, fine_tuned]


def test_the_authors_figure_draws_each_seed_and_their_stored_curves(tmp_path, monkeypatch):
    """tests/authors_results.py figure: one line per seed under one label, A.2's runs dotted beside the
    authors' protocol, the stored curves dashed (the oracle's one number at every step), and a return
    below the floor drawn on it with a down-pointing marker."""
    import authors_results
    import data

    def run(name, seed, protocol, curve):
        path = tmp_path / f"{name}_{protocol}_{seed}.json"
        path.write_text(json.dumps({"algorithm": "maml", "test": {"return_by_step": curve},
                                    "config": {"env": "navigation2d", "seed": seed, "protocol": protocol,
                                               "compare": None if name == "maml" else name}}))
        return str(path)
    stored = tmp_path / "stored.json"
    stored.write_text(json.dumps({"return_by_step": {"navigation2d/maml": [[-40, 1], [-11, 1], [-3, 1], [-3, 1], [-2, 1]],
                                                     "navigation2d/oracle": [[-2.3, 0.1]],
                                                     "halfcheetah-dir/maml": [[-50, 1]] * 4}}))
    paths = [run("maml", 1, "authors", [[-40, 2], [-12, 2], [-6, 2], [-5, 2]]),
             run("maml", 0, "authors", [[-372, 9], [-38, 5], [-17, 4], [-12, 6]]),
             run("maml", 0, "a2", [[-35, 4], [-13, 2], [-7, 1], [-8, 1]])]
    drawn = {}
    monkeypatch.setattr(data, "plot_curves", lambda out, curves, title, *a: drawn.update(curves=curves, title=title))
    authors_results.figure("navigation2d", str(tmp_path / "f.png"), *paths, stored=str(stored), floor=-100)
    labels = [c[0] for c in drawn["curves"]]
    assert labels == ["MAML, ours (2 seeds)", None, "MAML, ours, A.2's settings", "MAML, authors' stored",
                      "oracle, authors' stored"]
    seed0 = drawn["curves"][0]                                     # sorted by seed: seed 0 first
    assert seed0[2][0] == (-100, 0.0) and seed0[2][1] == (-38, 5) and seed0[3]["marker"] == "v"
    assert drawn["curves"][1][3]["marker"] == "o" and "linestyle" not in drawn["curves"][1][3]
    assert drawn["curves"][2][3]["linestyle"] == ":"
    assert [c[3]["linestyle"] for c in drawn["curves"][3:]] == ["--", "--"]
    assert len(drawn["curves"][3][2]) == 4 and drawn["curves"][4][2] == [[-2.3, 0.1]] * 4
    with pytest.raises(SystemExit, match="not a halfcheetah-dir run"):
        authors_results.figure("halfcheetah-dir", str(tmp_path / "g.png"), *paths, stored=str(stored))
