"""rl.py: the shared meta-RL plumbing for maml.py and anil.py (MAML Algorithm 3).

Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
ICML 2017, §3.2, §5.3 and Appendix A.2. This file holds everything that is not the meta-learning
algorithm: the task environments, the Gaussian policy, sampling, the linear baseline, GAE, the
policy-gradient loss and the TRPO meta-step. The algorithm file passes in its inner loop
(`inner_adapt`), so maml.py adapts every policy parameter and anil.py only the head:

    Alg. 3 line 3     sample a batch of tasks T_i ~ p(T)                    train(): task_family(env).sample_tasks
    Alg. 3 line 5     K trajectories D_i with f_θ                           sample()
    Alg. 3 lines 6-7  θ'_i = θ − α ∇θ L_Ti(f_θ), L of Eq. (4) by REINFORCE   inner_adapt (maml.py / anil.py)
    Alg. 3 line 8     trajectories D'_i with f_θ'_i                         sample()
    Alg. 3 line 10    meta-update on Σ_i L_Ti(f_θ'_i) with TRPO (§5.3)       trpo_step()
    A.2               α for the first test step, α/2 after; best model kept  adaptation_returns(), train()

Symbols, as in maml.py:
    θ   params       policy parameters (fc1-3 of a 2×100 ReLU MLP, and a state-independent log σ)
    θ'  fast         adapted parameters, one copy per task (leading dimension T)
    α   inner_lr     inner step size (A.2: 0.1)
    K   episodes     trajectories per task and per gradient step (§5.3: 20)
    T   meta_batch_size   tasks per meta-update (A.2: 20 navigation, 40 locomotion)
    H   horizon      steps per episode (100 navigation, 200 locomotion)
    γ, λ gamma, gae_lambda   discount and GAE parameter (0.99, 1.0)

Run:    python maml.py --env navigation2d          (the run behind the authors' stored results, their protocol)
        python maml.py --env navigation2d --protocol a2   (the paper's stated settings, A.2: 46 minutes on 1 thread)
        python anil.py --env halfcheetah-dir --iterations 50
        python maml.py --env navigation2d --help   (every flag with its paper value)
"""

import argparse
import json
import math
import time
from dataclasses import dataclass
from functools import partial

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

import data


# ---------------------------------------------------------------------------------------------
# A small helper of its own, so that this plumbing imports no algorithm file (maml.py has a twin)
# ---------------------------------------------------------------------------------------------

def per_task(params, tasks):
    """θ seen by each of T tasks: (T, *shape) views, whose gradients flow back into θ."""
    return {k: v.expand(tasks, *v.shape) for k, v in params.items()}


# ---------------------------------------------------------------------------------------------
# Config: MAML §5.3 and A.2, with the reference PyTorch implementation's TRPO settings
# ---------------------------------------------------------------------------------------------

# A.2 (--protocol a2, the default where the authors stored no results): one inner step with α = 0.1;
# meta-batch 20 (navigation) or 40 (locomotion); up to 500 meta-iterations. §5.3: 20 rollouts per gradient
# step (40 for the ant direction task); horizon 100 (navigation) and 200 (locomotion). TRPO: max KL 0.01, 10
# conjugate-gradient iterations with damping 1e-5, line search of 15 steps with ratio 0.8 (rllab's and
# pytorch-maml-rl's values).
ENV_SETTINGS = {
    "navigation2d":    dict(meta_batch_size=20, episodes=20, horizon=100),
    "halfcheetah-dir": dict(meta_batch_size=40, episodes=20, horizon=200),
    "halfcheetah-vel": dict(meta_batch_size=40, episodes=20, horizon=200),
    "ant-dir":         dict(meta_batch_size=40, episodes=40, horizon=200),
    "ant-vel":         dict(meta_batch_size=40, episodes=20, horizon=200),
}
A2 = dict(inner_lr=0.1, iterations=500, max_kl=0.01, eval_episodes=40)

# --protocol authors (the default for these two envs): the runs behind the authors' stored results
# (cbfinn/maml_rl, icml/icml_*_results_*.pkl, MAML Table 4 and Fig. 4/5), read from the scripts that wrote
# them. Navigation: test_maml_point.py loads trpomaml1_fbs20_mbs20_flr_0.5 (maml_trpo_point.py: α 0.5,
# meta-batch 20, 20 trajectories, 100 iterations, snapshot_mode "last"); its pretrained policy maml0_… is the
# same script with use_maml=False (maml_npo.py: one Adam step, lr 1e-3, per iteration on the pre-update
# batch); its oracle is trpo_point.py (TRPO, 1000 steps = 10 episodes of fresh goals per iteration, 100
# iterations). The test is VPG with a first step of α and later steps of α/2 (init_learning_rate, then
# learning_rate 0.5·α; 0.5 for MAML, pretrained and random), 4000 environment steps per step (40 paths of
# 100), on 40 goals drawn by np.random.seed(1). HalfCheetah direction: test_maml_cheetah_direc.py loads
# maml1_fbs20_mbs40_flr_0.1_mlr0.02/itr_100 (α 0.1, meta-batch 40, max KL 0.02, 100 iterations); pretrained is
# randenv (TRPO on the pooled tasks); the test steps are 0.1 (MAML), 0.2 (pretrained) and 0.5 (random), 4000
# steps (20 paths of 200), directions from 40 draws of U[0, 2] after np.random.seed(1) (backward below 1).
AUTHORS = {
    "navigation2d": {None: dict(inner_lr=0.5, iterations=100, max_kl=0.01, meta_batch_size=20, eval_episodes=40),
                     "pretrained": dict(pretrain_adam_lr=1e-3),
                     "oracle": dict(meta_batch_size=10, episodes=1)},
    "halfcheetah-dir": {None: dict(inner_lr=0.1, iterations=100, max_kl=0.02, meta_batch_size=40, eval_episodes=20),
                        # their pretrained policy: plain TRPO, 100 trajectories a step, KL 0.01 (cluster_trpo_cheetah.py)
                        "pretrained": dict(inner_lr=0.2, max_kl=0.01, meta_batch_size=5),
                        "random": dict(inner_lr=0.5)},
}


def authors_test_tasks(env, n=40):
    """The authors' test tasks: np.random.seed(1), then 40 draws (test_maml_point.py, test_maml_cheetah_direc.py)."""
    draws = np.random.RandomState(1)
    if env == "navigation2d":
        return [{"goal": tuple(g)} for g in draws.uniform(-0.5, 0.5, size=(n, 2))]
    return [{"direction": -1.0 if v < 1.0 else 1.0} for v in draws.uniform(0.0, 2.0, size=n)]


def build_parser(prog, algorithm):
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=data.HelpFormatter, allow_abbrev=False,
        description=f"Meta-RL with {algorithm.upper()} (MAML Algorithm 3, §5.3, A.2): REINFORCE in "
                    "the inner loop, TRPO as the meta-optimizer. Flags left unset take the paper's value.")
    a = p.add_argument
    a("--env", required=True, choices=sorted(ENV_SETTINGS), help="task distribution (§5.3)")
    a("--first-order", action="store_true", help="first-order: the inner gradient is a constant in the "
      "meta-gradient and in TRPO's Hessian-vector products")
    a("--protocol", choices=["a2", "authors"], default=None, help="the presets of the unset flags: authors, the "
      "runs behind the authors' stored results (α 0.5 / 0.1, 100 iterations, the last iterate, their 40 test "
      "tasks, their pretrained policy; the default for navigation2d and halfcheetah-dir, whose results they "
      "stored); a2, the paper's stated settings (A.2: α 0.1, 500 iterations, the best validated model; the "
      "default for the other envs)")
    a("--inner-lr", type=float, default=None, help="α, inner step size (A.2: 0.1; the authors' runs: 0.5 "
      "navigation, 0.1 HalfCheetah; α/2 after the first test step)")
    a("--meta-batch-size", type=int, default=None, help="T, tasks per meta-update (A.2: 20 navigation, 40 locomotion)")
    a("--episodes", type=int, default=None, help="K, trajectories per task and gradient step (§5.3: 20; ant-dir 40)")
    a("--horizon", type=int, default=None, help="H, steps per episode (§5.3: 100 navigation, 200 locomotion)")
    a("--iterations", type=int, default=None, help="meta-iterations (A.2: up to 500; the authors' runs: 100)")
    a("--gamma", type=float, default=0.99, help="γ, discount")
    a("--gae-lambda", type=float, default=1.0, help="λ of GAE (1.0: Monte-Carlo returns minus the baseline)")
    a("--max-kl", type=float, default=None, help="TRPO trust region: mean KL between adapted policies (0.01)")
    a("--cg-iters", type=int, default=10, help="conjugate-gradient iterations")
    a("--cg-damping", type=float, default=1e-5, help="damping added to the Hessian-vector product")
    a("--hvp", choices=["gauss-newton", "double-backprop"], default="gauss-newton", help="KL Hessian-vector "
      "products: both exact at the old parameters; gauss-newton skips the third derivatives (faster)")
    a("--ls-steps", type=int, default=15, help="backtracking line-search steps")
    a("--ls-ratio", type=float, default=0.8, help="backtracking ratio")
    a("--val-every", type=int, default=None, help="validate every this many iterations (default: iterations / 20)")
    a("--val-tasks", type=int, default=20, help="validation tasks; the best model by the return after one step "
      "is kept (A.2)")
    a("--test-tasks", type=int, default=40, help="meta-test tasks")
    a("--eval-steps", type=int, default=3, help="gradient steps at test time (Fig. 4/5: up to 3)")
    a("--eval-episodes", type=int, default=None, help="trajectories per task and gradient step at test time "
      "(§5.3: 'up to 4 gradient updates, each with 40 samples')")
    a("--test-lrs", type=float, nargs="+", default=None, metavar="LR", help="the step size of each test step "
      "(default: α, then α/2 for the later steps, as A.2 and the authors' test scripts)")
    a("--sampling", choices=["episodes", "steps"], default=None, help="a batch per task: episodes, K episodes "
      "(§5.3, --protocol a2); steps, whole episodes until K·H steps (rllab's samplers, --protocol authors), "
      "so that episodes that end early at the goal leave room for more")
    a("--compare", choices=["pretrained", "random", "oracle"], default=None, help="a comparison policy of "
      "Fig. 4/5 instead of meta-learning: pretrained (TRPO on all tasks, no inner loop), random (the "
      "initialization, not trained), both fine-tuned at test time by this script's inner loop, or oracle "
      "(no inner loop, the task appended to the observation, never fine-tuned: §5.3's upper bound)")
    a("--vector", choices=["sync", "async"], default="sync", help="gymnasium vector env: one process, or one "
      "process per environment (MuJoCo tasks)")
    a("--num-envs", type=int, default=None, help="environments stepped together, a multiple of K "
      "(default: K × meta-batch with sync, K with async)")
    data.add_session_flags(p, "--iterations, --inner-lr, --max-kl", predict=False)
    a("--plot", nargs="?", const="auto", default=None,
      help="save the return against gradient steps (Fig. 4/5); needs matplotlib")
    a("--snapshot", choices=["best", "last"], default=None, help="the model tested: best, the best validated "
      "one (A.2, --protocol a2), or last, the last iterate (the authors' snapshot_mode 'last', --protocol authors)")
    a("--plot-with", nargs="+", default=None, metavar="JSON",
      help="with --plot: also draw the test curves of these runs (their --out files), e.g. MAML beside ANIL")
    return p


def finalize_config(cfg, algorithm="maml"):
    """Fill unset flags with the env's settings of the chosen protocol and reject impossible combinations.
    The protocol is the authors' where their stored results exist (STYLE: the run behind the number)."""
    if cfg.protocol is None:
        cfg.protocol = "authors" if cfg.env in AUTHORS else "a2"
    if cfg.protocol == "authors" and cfg.env not in AUTHORS:
        raise SystemExit(f"error: --protocol authors: the authors' stored results cover {' and '.join(AUTHORS)} "
                         f"here, not {cfg.env}")
    preset = dict(ENV_SETTINGS[cfg.env], **A2, snapshot="best", sampling="episodes", pretrain_adam_lr=None)
    if cfg.protocol == "authors":
        preset.update(AUTHORS[cfg.env][None], snapshot="last", sampling="steps", **AUTHORS[cfg.env].get(cfg.compare, {}))
    if algorithm == "anil" and cfg.compare is None:      # the comparison policies keep their own batches
        preset["meta_batch_size"] = 40                     # ANIL App. E.5: "a batch size of 40"
    for k, v in preset.items():
        if getattr(cfg, k, None) is None:
            setattr(cfg, k, v)
    if cfg.test_lrs is not None and len(cfg.test_lrs) != cfg.eval_steps:
        raise SystemExit(f"error: --test-lrs gives {len(cfg.test_lrs)} step sizes for --eval-steps {cfg.eval_steps}")
    if cfg.num_envs is None:
        cfg.num_envs = cfg.episodes * (cfg.meta_batch_size if cfg.vector == "sync" else 1)
    if cfg.val_every is None:
        cfg.val_every = max(1, cfg.iterations // 20)
    if cfg.num_envs % cfg.episodes:
        raise SystemExit(f"error: --num-envs {cfg.num_envs} must be a multiple of --episodes {cfg.episodes}: "
                         f"each task's K episodes run side by side")
    if not 0 < cfg.ls_ratio < 1:
        raise SystemExit(f"error: --ls-ratio {cfg.ls_ratio}: the line search's shrink factor lies in (0, 1)")
    for name in ("gamma", "gae_lambda"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} {getattr(cfg, name)} must lie in [0, 1]")
    if cfg.cg_damping < 0:
        raise SystemExit(f"error: --cg-damping {cfg.cg_damping} must be at least 0")
    if cfg.plot_with and not cfg.plot:
        raise SystemExit("error: --plot-with adds curves to --plot; give --plot PATH too")
    for path in cfg.plot_with or []:
        try:
            with open(path) as f:
                run = json.load(f)
            env, _ = run["config"]["env"], run["test"]["return_by_step"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"error: --plot-with {path} is not the --out JSON of a meta-RL run ({e!r})") from None
        if env != cfg.env:
            raise SystemExit(f"error: --plot-with {path} is not a {cfg.env} run")
    return cfg


# ---------------------------------------------------------------------------------------------
# Environments. Each task family has sample_tasks(n, rng=None) (rng: a numpy Generator, a seed,
# or None for fresh entropy); a vector of environments takes one task per environment through
# set_attr("task", [...]).
# ---------------------------------------------------------------------------------------------

class Navigation2DVectorEnv(gym.vector.VectorEnv):
    """§5.3 2D navigation for `num_envs` points at once, in numpy. A point starts at (0, 0); the
    policy acts in [-1, 1]² and the point moves by clip(0.1·a, -0.1, 0.1), as in the authors'
    code (cbfinn/maml_rl, maml_examples/maml_trpo_point.py wraps point_env_randgoal.py, whose
    velocity box is [-0.1, 0.1]², in rllab's normalize(), which maps [-1, 1] onto the box and
    clips). The paper does not say; without the scaling the initial σ = 1 is 10x the box. The
    reward is minus the distance to the goal (the code's; §5.3's text says squared distance); the
    episode ends when both coordinates are within 0.01 of the goal, or after `horizon` steps.
    Goals are U[-0.5, 0.5]² (the unit square of §5.3, centred on the start)."""

    def __init__(self, num_envs, horizon=100):
        self.num_envs = num_envs
        self.horizon = horizon
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.single_action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self.goals = np.zeros((num_envs, 2))
        self.positions = np.zeros((num_envs, 2))
        self.steps = np.zeros(num_envs, dtype=np.int64)

    @staticmethod
    def sample_tasks(n, rng=None):
        return [{"goal": tuple(g)} for g in np.random.default_rng(rng).uniform(-0.5, 0.5, size=(n, 2))]

    def set_attr(self, name, values):   # name: "task", the one attribute sample() sets
        values = values if isinstance(values, (list, tuple)) else [values] * self.num_envs
        self.goals = np.array([v["goal"] for v in values], dtype=np.float64)

    def reset(self, *, seed=None, options=None):
        self.positions = np.zeros((self.num_envs, 2))
        self.steps[:] = 0
        return self.positions.astype(np.float32), {}

    def step(self, actions):
        self.positions = self.positions + np.clip(0.1 * actions, -0.1, 0.1)
        self.steps += 1
        offset = self.positions - self.goals
        rewards = -np.sqrt((offset ** 2).sum(1))
        terminated = (np.abs(offset) < 0.01).all(1)
        truncated = self.steps >= self.horizon
        return self.positions.astype(np.float32), rewards, terminated, truncated, {}


@dataclass(frozen=True)
class Locomotion:
    """A §5.3 locomotion task family. Direction tasks (v_max None): run forward or backward,
    d = ±1 with equal probability, reward d·v_x. Velocity tasks: goal velocity U[0, v_max], reward
    −|v_x − v_goal|. Both add bonus − ctrl_cost·Σa² + survive per step, and the ant the contact
    cost (gymnasium's reward_contact, with contact_cost_weight)."""
    env_id: str
    v_max: float
    ctrl_cost: float
    bonus: float = 0.0
    survive: float = 0.0
    contact_cost_weight: float = None

    def sample_tasks(self, n, rng=None):
        rng = np.random.default_rng(rng)
        if self.v_max is None:
            return [{"direction": float(d)} for d in rng.choice([-1.0, 1.0], size=n)]
        return [{"velocity": float(v)} for v in rng.uniform(0.0, self.v_max, size=n)]


# The cheetah's control cost 0.05·Σa² is the 0.5·0.1 of the reference environments. The ant's costs
# (rllab's and the reference environments' values): control 0.005·Σa², contact 5e-4·Σ clip(cfrc_ext, −1, 1)²
# (gymnasium's reward_contact with contact_cost_weight = 5e-4), survive bonus 0.05 per step. Ant-v5 ends the
# episode when the torso leaves z ∈ [0.2, 1]. A.2, ant-vel: "we added a positive reward bonus at each timestep
# to prevent the ant from ending the episode"; its size, 1.0, is the reference environments'.
LOCOMOTION = {
    "halfcheetah-dir": Locomotion("HalfCheetah-v5", v_max=None, ctrl_cost=0.05),
    "halfcheetah-vel": Locomotion("HalfCheetah-v5", v_max=2.0, ctrl_cost=0.05),
    "ant-dir": Locomotion("Ant-v5", v_max=None, ctrl_cost=0.005, survive=0.05, contact_cost_weight=5e-4),
    "ant-vel": Locomotion("Ant-v5", v_max=3.0, ctrl_cost=0.005, bonus=1.0, survive=0.05, contact_cost_weight=5e-4),
}


class LocomotionTask(gym.Wrapper):
    """gymnasium's MuJoCo HalfCheetah-v5 / Ant-v5 with the reward of the MAML task `task` of the
    family LOCOMOTION[name]. Actions are clipped to the action box before MuJoCo sees them, and
    the control cost is of the clipped action, the control that was applied."""

    def __init__(self, name, horizon):
        family = LOCOMOTION[name]
        kwargs = {} if family.contact_cost_weight is None else {"contact_cost_weight": family.contact_cost_weight}
        try:
            env = gym.make(family.env_id, max_episode_steps=horizon, **kwargs)
        except (ImportError, gym.error.DependencyNotInstalled) as e:
            raise SystemExit(f"error: {family.env_id} needs MuJoCo: pip install 'gymnasium[mujoco]' ({e})") from None
        super().__init__(env)
        self.family = family
        self.task = family.sample_tasks(1, 0)[0]

    def step(self, action):
        f, task = self.family, self.task
        action = np.clip(action, self.action_space.low, self.action_space.high)
        obs, _, terminated, truncated, info = self.env.step(action)
        v = info["x_velocity"]
        progress = task["direction"] * v if "direction" in task else -abs(v - task["velocity"])
        reward = (progress + f.bonus - f.ctrl_cost * float(np.square(action).sum())
                  + info.get("reward_contact", 0.0) + f.survive)
        return obs, reward, terminated, truncated, info


def task_vectors(tasks):
    """The oracle's extra input: each task's parameters as a vector, (tasks, d)."""
    return torch.from_numpy(np.array([np.hstack(list(t.values())) for t in tasks], dtype=np.float32))


def task_family(name):
    """The object whose sample_tasks(n, rng) draws this family's tasks."""
    return Navigation2DVectorEnv if name == "navigation2d" else LOCOMOTION[name]


def make_vector_env(name, num_envs, horizon, vector="sync"):
    if name == "navigation2d":
        return Navigation2DVectorEnv(num_envs, horizon)   # numpy: already one batched computation
    make = partial(LocomotionTask, name, horizon)
    return (gym.vector.AsyncVectorEnv if vector == "async" else gym.vector.SyncVectorEnv)([make] * num_envs)


# ---------------------------------------------------------------------------------------------
# The policy: a Gaussian MLP, 2×100 ReLU (§5.3), with a learned state-independent log σ
# ---------------------------------------------------------------------------------------------

def init_policy(obs_dim, act_dim, generator, hidden=(100, 100)):
    params = {}
    sizes = [obs_dim, *hidden, act_dim]
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):   # nn.Linear's init
        bound = 1.0 / math.sqrt(n_in)
        params[f"fc{i}.w"] = (torch.rand(n_in, n_out, generator=generator) * 2 - 1) * bound
        params[f"fc{i}.b"] = (torch.rand(n_out, generator=generator) * 2 - 1) * bound
    params["log_std"] = torch.zeros(act_dim)      # σ = 1 at the start, as rllab's GaussianMLPPolicy
    return params


def policy_body(params, obs):
    """fc1 and fc2 with ReLU: obs (T, B, obs_dim) -> features (T, B, 100)."""
    h = obs
    for i in (1, 2):
        h = F.relu(torch.baddbmm(params[f"fc{i}.b"].unsqueeze(1), h, params[f"fc{i}.w"]))
    return h


def policy_head(params, features):
    """The output layer: the mean (T, B, act_dim) from fc3, and log σ (T, act_dim)."""
    mean = torch.baddbmm(params["fc3.b"].unsqueeze(1), features, params["fc3.w"])
    return mean, params["log_std"]


def policy_forward(params, obs):
    return policy_head(params, policy_body(params, obs))


def gaussian_log_prob(dist, actions):
    """log π(a|s) of a diagonal Gaussian, summed over action dimensions: (T, B, A) -> (T, B)."""
    mean, log_std = dist
    log_std = log_std.unsqueeze(1)
    z = (actions - mean) / log_std.exp()
    return (-0.5 * z ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def gaussian_kl(old, new):
    """KL(old ‖ new) of diagonal Gaussians, summed over action dimensions: (T, B)."""
    (m0, s0), (m1, s1) = old, new
    s0, s1 = s0.unsqueeze(1), s1.unsqueeze(1)
    return (s1 - s0 + ((2 * s0).exp() + (m0 - m1) ** 2) / (2 * (2 * s1).exp()) - 0.5).sum(-1)


# ---------------------------------------------------------------------------------------------
# Sampling: K episodes per task with the vector environment, the policy in the loop
# ---------------------------------------------------------------------------------------------

@dataclass
class Episodes:
    """K episodes of H steps for each of T tasks. Steps after an episode ended are padding,
    with mask 0. obs (T, K, H, obs_dim), actions (T, K, H, A), rewards / mask / log_prob
    (T, K, H); advantages (T, K, H) once computed. pack_steps() makes it (T, 1, S), each task's
    steps in one row, for the losses (which see steps, not episodes)."""
    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    mask: torch.Tensor
    log_prob: torch.Tensor
    advantages: torch.Tensor = None

    def to(self, device):
        return Episodes(*(None if v is None else v.to(device) for v in (
            self.obs, self.actions, self.rewards, self.mask, self.log_prob, self.advantages)))

    def returns(self):
        """The return of each episode, (T, K): the sum of its rewards."""
        return (self.rewards * self.mask).sum(-1)

    def mean_return(self):
        """Each task's mean return over its episodes that count (a step budget may drop some), (T,)."""
        counted = (self.mask[..., 0] > 0).to(self.rewards.dtype)
        return (self.returns() * counted).sum(1) / counted.sum(1)


def sample_steps(envs, params, tasks, episodes, horizon, generator, desc="sampling", oracle=False, min_steps=None):
    """sample(), or with min_steps whole episodes of each task until it has min_steps steps (rllab's
    samplers, with whole_paths: the authors' batches are K·H steps in training and 4000 at test, so an
    episode that ends early at the goal leaves room for more). Further rounds of `episodes` episodes are
    drawn for the tasks still short of their steps only; a task's episodes past its budget get mask 0.
    (T, E, H), E the most episodes any task needed: pack_steps() makes it small for the losses."""
    ep = sample(envs, params, tasks, episodes, horizon, generator, desc, oracle)
    if min_steps is None:
        return ep
    fields = ("obs", "actions", "rewards", "mask", "log_prob")
    chunks = [[{k: getattr(ep, k)[i] for k in fields}] for i in range(len(tasks))]   # per task, (K, H, ...) each
    steps = ep.mask.sum((1, 2))
    while (steps < min_steps).any():
        short = (steps < min_steps).nonzero().flatten().tolist()
        more = sample(envs, {k: v[short] for k, v in params.items()}, [tasks[i] for i in short], episodes, horizon,
                      generator, desc, oracle)
        for j, i in enumerate(short):
            chunks[i].append({k: getattr(more, k)[j] for k in fields})
            steps[i] += more.mask[j].sum()
    E = max(len(c) for c in chunks) * episodes
    ep = Episodes(*(torch.stack([F.pad(torch.cat([c[k] for c in task]),
                                       (0, 0) * (getattr(ep, k).dim() - 3) + (0, 0, 0, E - len(task) * episodes))
                                 for task in chunks]) for k in fields))
    lengths = ep.mask.sum(-1)                                             # (T, E)
    counted = (lengths.cumsum(1) - lengths < min_steps).to(ep.mask.dtype)  # the steps before it fall short
    ep.mask, ep.rewards = ep.mask * counted.unsqueeze(-1), ep.rewards * counted.unsqueeze(-1)
    return ep


def pack_steps(ep):
    """rllab's flat batch: each task's valid steps, in order, as one row (T, 1, S), S the most any task has.
    For the losses only, once the advantages are computed (the returns and GAE need the episodes): with a
    step budget, a task whose episodes end at the goal draws many short ones, each padded to H in
    sample_steps' layout (ANIL seed 1, iteration 98: 1773 episodes of 1.2 steps, 1% of 7.1 M step slots used,
    and the policy's graph over all of them ran out of 24 GB). A full batch keeps its order exactly."""
    valid = ep.mask.flatten(1) > 0                                        # (T, E·H)
    S = int(valid.sum(1).max())
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices[:, :S]   # valid steps first

    def take(x):
        flat_x = x.flatten(1, 2)
        idx = order.reshape(*order.shape, *([1] * (flat_x.dim() - 2))).expand(-1, -1, *flat_x.shape[2:])
        return flat_x.gather(1, idx).unsqueeze(1)
    return Episodes(*(None if v is None else take(v) for v in (
        ep.obs, ep.actions, ep.rewards, ep.mask, ep.log_prob, ep.advantages)))


@torch.no_grad()
def sample(envs, params, tasks, episodes, horizon, generator, desc="sampling", oracle=False):
    """Alg. 3 lines 5 and 8: `episodes` trajectories of each task with the policy θ (or θ'_i).
    params: (T, ...) on the CPU, one policy per task. Tasks run num_envs // K at a time, their K
    episodes side by side; the action noise and every reset seed come from `generator`. The
    oracle of Fig. 4/5 sees the task (goal, direction or velocity) appended to each observation."""
    from tqdm import tqdm
    T, K = len(tasks), episodes
    per_round = envs.num_envs // K
    rounds = [list(range(s, min(s + per_round, T))) for s in range(0, T, per_round)]
    parts = []
    bar = tqdm(total=len(rounds) * horizon, desc=desc, leave=False, disable=None, mininterval=0.5)
    for idx in rounds:
        slots = idx + [idx[-1]] * (per_round - len(idx))     # unused slots repeat the last task
        envs.set_attr("task", [tasks[i] for i in slots for _ in range(K)])
        p = {k: v[slots] for k, v in params.items()}
        seeds = torch.randint(0, 2 ** 31 - 1, (envs.num_envs,), generator=generator).tolist()
        obs, _ = envs.reset(seed=seeds)
        alive = np.ones(envs.num_envs, dtype=bool)
        rec = {k: [] for k in ("obs", "actions", "means", "rewards", "mask")}
        noise = torch.randn(horizon, per_round, K, params["log_std"].shape[-1], generator=generator)
        std = p["log_std"].exp().unsqueeze(1)                          # (R, 1, A)
        if oracle:
            seen_task = task_vectors([tasks[i] for i in slots]).unsqueeze(1).expand(-1, K, -1)   # (R, K, d)
        for t in range(horizon):
            o = torch.from_numpy(np.asarray(obs, dtype=np.float32)).reshape(per_round, K, -1)
            if oracle:
                o = torch.cat([o, seen_task], -1)
            mean = policy_forward(p, o)[0]                              # (R, K, A)
            action = mean + std * noise[t]
            obs, reward, terminated, truncated, _ = envs.step(action.reshape(envs.num_envs, -1).numpy())
            for k, v in (("obs", o), ("actions", action), ("means", mean), ("rewards", reward), ("mask", alive)):
                rec[k].append(v)
            alive = alive & ~(np.asarray(terminated) | np.asarray(truncated))
            bar.update(1)
            if not alive.any():
                break
        for k in ("rewards", "mask"):
            rec[k] = [torch.from_numpy(np.asarray(v, dtype=np.float32)).reshape(per_round, K) for v in rec[k]]
        batch = {k: torch.stack(v, 2) for k, v in rec.items()}               # (R, K, steps, ...)
        means, m, steps = batch.pop("means"), batch["mask"], len(rec["obs"])
        batch["log_prob"] = gaussian_log_prob((means.flatten(1, 2), p["log_std"]),
                                              batch["actions"].flatten(1, 2)).reshape(m.shape)
        bar.update(horizon - steps)
        # zero after an episode ended, whatever the env did; padded to H if every episode ended early
        parts.append({k: F.pad((v * (m.unsqueeze(-1) if v.dim() == 4 else m))[:len(idx)],
                               (0, 0) * (v.dim() - 3) + (0, horizon - steps)) for k, v in batch.items()})
    bar.close()
    return Episodes(**{k: torch.cat([b[k] for b in parts]) for k in parts[0]})


# ---------------------------------------------------------------------------------------------
# Advantages: the linear feature baseline (Duan et al. 2016) and GAE
# ---------------------------------------------------------------------------------------------

def baseline_features(obs, mask):
    """[o, o², t, t², t³, 1] with t = step / 100 (Duan et al.), zero on padded steps:
    (T, K, H, d) -> (T, K*H, 2d + 4). Observations are clipped to [-10, 10] as in rllab."""
    T, K, H, _ = obs.shape
    o = obs.clamp(-10, 10)
    t = (torch.arange(H, dtype=obs.dtype, device=obs.device) / 100.0).reshape(1, 1, H, 1).expand(T, K, H, 1)
    f = torch.cat([o, o ** 2, t, t ** 2, t ** 3, torch.ones_like(t)], -1) * mask.unsqueeze(-1)
    return f.reshape(T, K * H, -1)


def fit_baseline(obs, returns, mask, reg=1e-5, attempts=5):
    """Per task: w = argmin Σ_valid (f·w − G)² + reg·|w|², by the normal equations in float64,
    with reg raised ×10 when the solve fails. Returns the fitted values (T, K, H), 0 on padding."""
    feats = baseline_features(obs, mask).double()                           # (T, KH, D)
    target = (returns * mask).reshape(returns.shape[0], -1, 1).double()  # (T, KH, 1)
    gram, rhs = feats.transpose(1, 2) @ feats, feats.transpose(1, 2) @ target
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    for _ in range(attempts):
        w, info = torch.linalg.solve_ex(gram + reg * eye, rhs)
        if (info == 0).all() and torch.isfinite(w).all():
            break
        reg *= 10
    return ((feats @ w).reshape(returns.shape) * mask).to(returns.dtype)


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation: δ_t = r_t + γ V_{t+1} − V_t, A_t = Σ_l (γλ)^l δ_{t+l},
    with V = 0 past the end of an episode. λ = 1 gives G_t − V_t; λ = 1 with values
    0 gives the discounted return G_t = r_t + γ G_{t+1}. (..., H) -> (..., H)."""
    next_values = F.pad(values[..., 1:] * mask[..., 1:], (0, 1))
    deltas = (rewards + gamma * next_values - values) * mask
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(rewards.shape[-1])):
        running = (deltas[..., t] + gamma * lam * running) * mask[..., t]
        adv[..., t] = running
    return adv


def weighted_mean(x, mask, dims):
    return (x * mask).sum(dims) / mask.sum(dims).clamp_min(1)


def compute_advantages(ep, gamma, lam):
    """The baseline fitted on this batch, GAE, and normalization per task over its valid steps."""
    returns = gae(ep.rewards, torch.zeros_like(ep.rewards), ep.mask, gamma, 1.0)      # G_t
    values = fit_baseline(ep.obs, returns, ep.mask)
    adv = gae(ep.rewards, values, ep.mask, gamma, lam)
    mean = weighted_mean(adv, ep.mask, (1, 2)).reshape(-1, 1, 1)
    std = weighted_mean((adv - mean) ** 2, ep.mask, (1, 2)).sqrt().reshape(-1, 1, 1)
    ep.advantages = (adv - mean) / (std + 1e-8) * ep.mask
    return ep


# ---------------------------------------------------------------------------------------------
# Losses: REINFORCE for the inner loop, the importance-weighted surrogate and KL for TRPO
# ---------------------------------------------------------------------------------------------

def flat_obs(ep):
    return ep.obs.flatten(1, 2)                                       # (T, K*H, obs_dim)


def reinforce_loss(dist, ep):
    """Eq. (4) by the likelihood-ratio trick: −mean over valid steps of log π(a|s)·Â, per task (T,).
    dist: the policy's output on flat_obs(ep)."""
    logp = gaussian_log_prob(dist, ep.actions.flatten(1, 2)).reshape(ep.mask.shape)
    return -weighted_mean(logp * ep.advantages, ep.mask, (1, 2))


def surrogate_and_kl(fast, ep, old_dist):
    """TRPO's objective on the post-adaptation episodes D'_i, averaged over tasks:
    −E[π_θ'(a|s) / π_old(a|s) · Â], π_old being the policy that collected D'_i; and the mean KL
    between the adapted policies at the old and the new meta-parameters. Also returns the new
    policy's output (mean, log σ), for kl_hessian_vector_product."""
    dist = policy_forward(fast, flat_obs(ep))
    logp = gaussian_log_prob(dist, ep.actions.flatten(1, 2)).reshape(ep.mask.shape)
    ratio = (logp - ep.log_prob).exp()
    loss = -weighted_mean(ratio * ep.advantages, ep.mask, (1, 2)).mean()
    kl = weighted_mean(gaussian_kl(old_dist, dist).reshape(ep.mask.shape), ep.mask, (1, 2)).mean()
    return loss, kl, dist


# ---------------------------------------------------------------------------------------------
# TRPO (Schulman et al. 2015) on the meta-parameters
# ---------------------------------------------------------------------------------------------

def conjugate_gradient(matvec, b, iters=10, tol=1e-10):
    """Solves A x = b for a symmetric positive-definite A given as x -> A x. Returns x and A x.
    A x comes free as b − r, the residual the iteration keeps: TRPO needs xᵀA x for its step
    length, and one more product would cost a tenth of the meta-iteration."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r @ r
    for _ in range(iters):
        Ap = matvec(p)
        alpha = rr / (p @ Ap)
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = r @ r
        if rr_new < tol:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, b - r


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def hessian_vector_product(scalar, params, damping=0.0):
    """v -> (∇²scalar + damping·I) v by double backpropagation: the gradient is built with its
    graph once, and each product differentiates g·v. Through the inner step this reaches third
    derivatives of the inner loss; kl_hessian_vector_product avoids them."""
    grads = flat(torch.autograd.grad(scalar, params, create_graph=True))

    def hvp(v):
        return flat(torch.autograd.grad(grads @ v, params, retain_graph=True)) + damping * v
    return hvp


def kl_hessian_vector_product(dist, mask, params, damping=0.0):
    """v -> (∇²KL + damping·I) v at the old meta-parameters, where the KL and its gradient with
    respect to the policy's output are zero. The chain rule then leaves only the Gauss-Newton
    term, so the product is exactly Jᵀ M J v, with J = ∂(mean, log σ)/∂θ through the inner step
    (double backprop) and M the KL's Hessian in the output: 1/σ² for the mean, 2 for log σ, each
    weighted as the mean KL weights its steps. Equal to hessian_vector_product(kl) (tested), but
    it never differentiates the inner loss three times."""
    mean, log_std = dist                                             # (T, B, A), (T, A)
    T = mean.shape[0]
    step_weight = (mask / mask.sum(1, keepdim=True).clamp_min(1) / T).unsqueeze(-1)   # (T, B, 1)
    m_mean = step_weight / (2 * log_std.detach()).exp().unsqueeze(1)
    m_log_std = 2.0 * step_weight.sum(1)                             # (T, 1)
    # Jᵀu for a dummy u, kept as a graph in u: differentiating (Jᵀu)·v by u gives J v.
    u_mean = torch.zeros_like(mean, requires_grad=True)
    u_log_std = torch.zeros_like(log_std, requires_grad=True)
    jt_u = flat(torch.autograd.grad((mean * u_mean).sum() + (log_std * u_log_std).sum(), params,
                                    create_graph=True))

    def hvp(v):
        jv_mean, jv_log_std = torch.autograd.grad(jt_u @ v, (u_mean, u_log_std), retain_graph=True)
        mjv = (mean * (m_mean * jv_mean)).sum() + (log_std * (m_log_std * jv_log_std)).sum()
        return flat(torch.autograd.grad(mjv, params, retain_graph=True)) + damping * v
    return hvp


def trpo_step(params, objective, max_kl, cg_iters, cg_damping, ls_steps, ls_ratio, hvp_mode="gauss-newton"):
    """One TRPO update of the dict `params` in place. objective(params, create_graph) -> (loss,
    kl, dist, mask). The step direction solves H s = −g by conjugate gradient, H the Hessian of
    the KL; its length puts ½ sᵀHs at max_kl; the line search shrinks it by ls_ratio until the
    loss improves and the KL is within bounds, else θ stays. Returns a dict of diagnostics."""
    tensors = list(params.values())
    loss, kl, dist, mask = objective(params, create_graph=True)
    g = flat(torch.autograd.grad(loss, tensors, retain_graph=True, materialize_grads=True))
    if hvp_mode == "gauss-newton":
        hvp = kl_hessian_vector_product(dist, mask, tensors, cg_damping)
    else:
        hvp = hessian_vector_product(kl, tensors, cg_damping)
    step_dir, h_step_dir = conjugate_gradient(hvp, -g, cg_iters)
    shs = 0.5 * (step_dir @ h_step_dir)
    info = {"loss_before": loss.item(), "grad_norm": g.norm().item()}
    if not torch.isfinite(shs) or shs <= 0:
        return {**info, "accepted": False, "kl": 0.0, "loss_after": loss.item(), "ls_step": -1}
    full_step = step_dir * torch.sqrt(max_kl / shs)
    old = flat(tensors).detach()

    def assign(vector):
        with torch.no_grad():
            for t, v in zip(tensors, vector.split([t.numel() for t in tensors])):
                t.copy_(v.view_as(t))

    for i in range(ls_steps):
        assign(old + ls_ratio ** i * full_step)
        new_loss, new_kl, _, _ = objective(params, create_graph=False)
        if torch.isfinite(new_loss) and new_loss < loss and new_kl <= max_kl:
            return {**info, "accepted": True, "kl": new_kl.item(), "loss_after": new_loss.item(), "ls_step": i}
    assign(old)
    return {**info, "accepted": False, "kl": 0.0, "loss_after": loss.item(), "ls_step": ls_steps}


# ---------------------------------------------------------------------------------------------
# The meta-iteration (Alg. 3), given the algorithm's inner loop
# ---------------------------------------------------------------------------------------------

def adam_step(params, adam, objective):
    """One step of `adam` on the surrogate of `objective`, whose gradient at θ (importance ratio 1) is the
    REINFORCE gradient of Eq. (4) averaged over the tasks; with the numbers that trpo_step reports."""
    loss = objective(params, create_graph=False)[0]
    adam.zero_grad()
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params.values())).item()
    adam.step()
    with torch.no_grad():
        kl = objective(params, create_graph=False)[1].item()
    return {"loss_before": loss.item(), "grad_norm": grad_norm, "kl": kl, "ls_step": 0}


def no_inner_loop(params, episodes, inner_lr, first_order):
    """θ'_i = θ: the meta-step without its inner loop is TRPO on all tasks (Fig. 4/5's pretrained)."""
    return params


def cpu_copy(fast):
    """A detached copy on the CPU (a copy even there: TRPO later changes θ in place)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in fast.items()}


def meta_iteration(params, inner_adapt, envs, tasks, cfg, generator, device, adam=None):
    """Alg. 3 lines 3-10 for one meta-batch. inner_adapt(params (T, ...), episodes, α,
    first_order) -> θ'_i is the algorithm's inner loop. With `adam` (a torch.optim.Adam over θ),
    one Adam step replaces TRPO: the authors' pretrained policy (maml_npo.py, use_maml=False)."""
    T = len(tasks)
    theta = per_task(cpu_copy(params), T)
    oracle = cfg.compare == "oracle"
    budget = cfg.episodes * cfg.horizon if cfg.sampling == "steps" else None

    def batch(policy, name):   # the mean return per episode, and the batch for the losses
        ep = compute_advantages(sample_steps(envs, policy, tasks, cfg.episodes, cfg.horizon, generator, name, oracle,
                                             budget), cfg.gamma, cfg.gae_lambda)
        return ep.mean_return().mean().item(), (pack_steps(ep) if budget else ep).to(device)
    # Alg. 3 line 5: D_i with f_θ; line 6: the advantages for ∇θ L_Ti
    return_before, train_eps = batch(theta, "D_i")
    if inner_adapt is no_inner_loop:
        # the pretrained and oracle policies of Fig. 4/5: plain TRPO on the pooled batch D_i
        fast = per_task({k: v.detach() for k, v in params.items()}, T)
        valid_eps, return_after = train_eps, return_before
    else:
        # Alg. 3 line 7: θ'_i; line 8: D'_i with f_θ'_i
        fast = inner_adapt(per_task({k: v.detach().requires_grad_() for k, v in params.items()}, T),
                           train_eps, cfg.inner_lr, first_order=True)
        return_after, valid_eps = batch(cpu_copy(fast), "D'_i")
    with torch.no_grad():
        old_dist = tuple(d.detach() for d in policy_forward({k: v.detach() for k, v in fast.items()},
                                                            flat_obs(valid_eps)))

    def objective(p, create_graph):
        # The inner step is recomputed at every θ the line search tries; second-order unless
        # --first-order, so that g and the Hessian-vector products run through θ'_i(θ).
        with torch.enable_grad():
            f = inner_adapt(per_task(p, T), train_eps, cfg.inner_lr, first_order=cfg.first_order or not create_graph)
            return (*surrogate_and_kl(f, valid_eps, old_dist), valid_eps.mask.flatten(1))

    if adam is not None:   # the authors' pretrained policy: one Adam step on the pooled REINFORCE loss
        info = adam_step(params, adam, objective)
    else:                  # Alg. 3 line 10, with TRPO as the meta-optimizer (§5.3)
        info = trpo_step(params, objective, cfg.max_kl, cfg.cg_iters, cfg.cg_damping, cfg.ls_steps, cfg.ls_ratio,
                         cfg.hvp)
    info["return_before"], info["return_after"] = return_before, return_after
    return info


# ---------------------------------------------------------------------------------------------
# Evaluation: return per episode before adaptation and after 1..eval_steps steps (Fig. 4/5)
# ---------------------------------------------------------------------------------------------

def test_step_sizes(cfg, steps):
    """A.2 and the authors' test scripts: α for the first step, α/2 for the later ones; or --test-lrs."""
    return getattr(cfg, "test_lrs", None) or [cfg.inner_lr] + [cfg.inner_lr / 2] * (steps - 1)


def adaptation_returns(params, inner_adapt, envs, cfg, n_tasks, seed, steps, device, episodes, tasks=None,
                       record=None):
    """Mean return per episode of each of n_tasks tasks, the same for every model with this seed,
    after 0..steps gradient steps: (steps+1, n_tasks). A.2: α for the first step, α/2 for the
    later ones (or cfg.test_lrs). Each step samples `episodes` fresh episodes. `tasks` replaces
    the sampled ones; `record`, a dict, receives at each step the mean log σ, episode length and
    episodes per task. With cfg.sampling "steps", whole episodes until episodes·H steps per task."""
    tasks = tasks or task_family(cfg.env).sample_tasks(n_tasks, np.random.default_rng(seed))
    lrs = test_step_sizes(cfg, steps)
    budget = episodes * cfg.horizon if getattr(cfg, "sampling", "episodes") == "steps" else None
    generator = torch.Generator().manual_seed(seed)
    fast = per_task({k: v.detach() for k, v in params.items()}, len(tasks))
    rows = []
    for step in range(steps + 1):
        ep = sample_steps(envs, cpu_copy(fast), tasks, episodes, cfg.horizon, generator, f"eval step {step}",
                          cfg.compare == "oracle", budget)
        rows.append(ep.mean_return().numpy())
        if record is not None:
            lengths = ep.mask.sum(-1)
            record.setdefault("log_std", []).append(round(fast["log_std"].mean().item(), 4))
            record.setdefault("episode_length", []).append(round((lengths.sum() / (lengths > 0).sum()).item(), 2))
            record.setdefault("episodes", []).append(round((lengths > 0).sum(1).float().mean().item(), 2))
        if step < steps:
            ep = compute_advantages(ep, cfg.gamma, cfg.gae_lambda)
            ep = (pack_steps(ep) if budget else ep).to(device)
            fast = {k: v.detach().requires_grad_() for k, v in fast.items()}
            fast = {k: v.detach() for k, v in inner_adapt(fast, ep, lrs[step], first_order=True).items()}
    return np.stack(rows)


def plot_returns(path, stats, cfg, algorithm):
    """MAML Fig. 4/5: return per episode against gradient steps, with the curves of the runs
    given by --plot-with (their --out JSON files) on the same axes."""
    def label(config, algorithm):
        return config.get("compare") or algorithm.upper() + (" (first-order)" if config.get("first_order") else "")
    curves = [(label(vars(cfg), algorithm), range(len(stats)), stats)]
    for other in cfg.plot_with or []:
        with open(other) as f:
            run = json.load(f)
        theirs = run["test"]["return_by_step"]
        curves.append((label(run["config"], run.get("algorithm", "?")), range(len(theirs)), theirs))
    data.plot_curves(path, curves, f"{cfg.env}, {cfg.test_tasks} test tasks", "number of gradient steps",
                     "average return per episode")


# ---------------------------------------------------------------------------------------------
# Training and main
# ---------------------------------------------------------------------------------------------

def train(cfg, state, test_adapt, algorithm):
    # the comparison policies train without an inner loop; pretrained is fine-tuned by the script's at test
    inner_adapt = no_inner_loop if cfg.compare in ("pretrained", "oracle") else test_adapt
    device = torch.device(cfg.device)
    params = {k: v.detach().clone().to(device).requires_grad_() for k, v in state["params"].items()}
    best = state.get("best", {"params": {k: v.clone() for k, v in state["params"].items()},
                              "val_return": -math.inf, "iteration": 0})
    task_rng = np.random.default_rng(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    if "rng" in state:   # resuming
        task_rng.bit_generator.state = state["rng"]["tasks"]
        generator.set_state(state["rng"]["sampling"])
    history = state.get("history", [])
    adam = None
    if getattr(cfg, "pretrain_adam_lr", None):    # the authors' pretrained policy: Adam instead of TRPO
        adam = torch.optim.Adam(params.values(), lr=cfg.pretrain_adam_lr)
        if "adam" in state:
            adam.load_state_dict(state["adam"])
    envs = make_vector_env(cfg.env, cfg.num_envs, cfg.horizon, cfg.vector)
    info, done = None, state["iteration"]     # the last iteration's numbers, for the log line

    def validate():
        nonlocal best
        # A.2 keeps the model with the best return; we measure it on fixed validation tasks
        val = adaptation_returns(params, test_adapt, envs, cfg, cfg.val_tasks, cfg.seed + 1, 1, device,
                                 cfg.episodes)
        line = {"train_return_before": round(info["return_before"], 3),
                "train_return_after": round(info["return_after"], 3),
                "val_return_before": round(float(val[0].mean()), 3),
                "val_return_after": round(float(val[1].mean()), 3),
                "kl": round(info["kl"], 5), "ls_step": info["ls_step"], "log_std": round(params["log_std"].mean().item(), 4)}
        if line["val_return_after"] > best["val_return"]:     # False for a NaN, which stops the run
            best = {"params": cpu_copy(params), "val_return": line["val_return_after"], "iteration": done}
        return line

    def checkpoint(iteration):
        return {"params": cpu_copy(params), "config": vars(cfg), "iteration": iteration, "algorithm": algorithm,
                "format": 1, "best": best, "history": history,
                "rng": {"tasks": task_rng.bit_generator.state, "sampling": generator.get_state()},
                **({"adam": adam.state_dict()} if adam else {})}

    # the progress bar, validation, checkpoints and stops: data.Training
    with data.Training(cfg, state["iteration"], history, validate, checkpoint, f"{algorithm} {cfg.env}",
                       "--inner-lr or --max-kl") as loop:
        for it in loop:                                                   # Alg. 3 line 2: while not done
            done = it + 1
            tasks = task_family(cfg.env).sample_tasks(cfg.meta_batch_size, task_rng)   # line 3
            info = meta_iteration(params, inner_adapt, envs, tasks, cfg, generator, device, adam)   # lines 4-10
            if not all(math.isfinite(info[k]) for k in ("loss_before", "grad_norm", "return_after")) or \
                    not all(torch.isfinite(v).all() for v in params.values()):
                raise data.NonFiniteLoss("non-finite surrogate loss, gradient or parameters")
            loop.show({"R0": f"{info['return_before']:.2f}", "R1": f"{info['return_after']:.2f}",
                       "kl": f"{info['kl']:.4f}"})
    envs.close()
    return loop.state


SESSION_FLAGS = {"device", "out", "save", "resume", "load", "eval_only", "plot", "plot_with", "vector", "num_envs",
                 "snapshot", "test_lrs"}
# may differ from the checkpoint's: the evaluation, the length and the step sizes (α, TRPO's max KL)
OVERRIDABLE_FLAGS = {"iterations", "test_tasks", "eval_steps", "val_tasks", "eval_episodes", "inner_lr", "max_kl"}


def run(cfg, saved, inner_adapt, algorithm):
    """The meta-RL run of maml.py and anil.py (`--env NAME`), given the merged config, the loaded
    checkpoint (or None) and the algorithm's inner loop."""
    source = cfg.resume or cfg.load
    device = torch.device(cfg.device)
    print("config: " + " ".join(f"{k}={v}" for k, v in vars(cfg).items()))
    probe = make_vector_env(cfg.env, cfg.episodes, cfg.horizon, "sync")
    obs_dim, act_dim = probe.single_observation_space.shape[0], probe.single_action_space.shape[0]
    probe.close()
    if cfg.compare == "oracle":
        obs_dim += task_vectors(task_family(cfg.env).sample_tasks(1, 0)).shape[1]
    if saved:
        state = saved
        if saved["params"]["fc1.w"].shape[0] != obs_dim:
            raise SystemExit(f"error: the policy in {source} does not fit {cfg.env}")
    else:
        state = {"params": init_policy(obs_dim, act_dim, torch.Generator().manual_seed(cfg.seed)), "iteration": 0}

    if cfg.compare == "oracle":   # §5.3 fine-tunes only (a) pretrained and (b) random; the oracle is the bound
        inner_adapt = no_inner_loop
    started = time.time()
    if not cfg.eval_only and cfg.compare != "random":
        state = train(cfg, state, inner_adapt, algorithm)
    results = {"config": vars(cfg), "algorithm": algorithm, "train_seconds": round(time.time() - started, 1),
               "iteration": state["iteration"], "history": state.get("history", [])}
    best = state.get("best")
    chosen = best["params"] if best and cfg.snapshot == "best" else state["params"]
    if best and cfg.snapshot == "best":
        print(f"best model: iteration {best['iteration']}, validation return after one step {best['val_return']:.3f}")
        results["best_iteration"] = best["iteration"]
    params = {k: v.to(device) for k, v in chosen.items()}
    # as many tasks side by side as in training, each with its eval_episodes
    envs = make_vector_env(cfg.env, cfg.num_envs // cfg.episodes * cfg.eval_episodes, cfg.horizon, cfg.vector)
    record = {}
    tasks = authors_test_tasks(cfg.env, cfg.test_tasks) if cfg.protocol == "authors" else None
    curve = adaptation_returns(params, inner_adapt, envs, cfg, cfg.test_tasks, cfg.seed + 2, cfg.eval_steps, device,
                               cfg.eval_episodes, tasks, record)
    envs.close()
    stats = [data.mean_ci(r) for r in curve]
    print(f"\nmeta-test: {cfg.test_tasks} tasks of {cfg.env}, {cfg.eval_episodes} episodes per step, "
          f"{cfg.compare or algorithm.upper()}, return per episode ± 95% CI after k gradient steps "
          f"(step sizes {test_step_sizes(cfg, cfg.eval_steps)}):")
    print("  " + "  ".join(f"{s}:{m:.2f}±{c:.2f}" for s, (m, c) in enumerate(stats)))
    print(" ".join(f"return_step{s}={m:.3f}" for s, (m, _) in enumerate(stats)))
    results["test"] = {"return_by_step": stats, "log_std_by_step": record["log_std"],
                       "episode_length_by_step": record["episode_length"], "episodes_by_step": record["episodes"]}
    results["eval_seconds"] = round(time.time() - started - results["train_seconds"], 1)
    return results


def main(argv, adapt_policy, algorithm, prog):
    """`python maml.py --env NAME` (or anil.py): the meta-RL command line, merged with a checkpoint as the
    supervised one is, then run() with the script's inner loop."""
    # --resume takes this script's checkpoints; --load tests either script's
    args, saved, _ = data.parse_args(build_parser(prog, algorithm), argv, algorithm, testable={"maml", "anil"},
                                     session_flags=SESSION_FLAGS, overridable=OVERRIDABLE_FLAGS)
    data.refuse_distributed(prog + " --env", "TRPO's meta-step is a sequence of conjugate-gradient steps over the "
                            "whole meta-batch; --vector async samples the environments in parallel processes")
    data.check_session_flags(args)
    if saved and "protocol" not in saved["config"] and args.protocol is None:
        args.protocol = "a2"           # a checkpoint from before --protocol existed: A.2 was the only preset
    cfg = finalize_config(args, algorithm)
    data.seed_everything(cfg.seed)
    results = data.write_results(cfg.out, run(cfg, saved, adapt_policy, algorithm))
    if cfg.plot:
        plot_returns(f"{algorithm}_{cfg.env}.png" if cfg.plot == "auto" else cfg.plot,
                     results["test"]["return_by_step"], cfg, algorithm)
    return results
