"""maml.py: Model-Agnostic Meta-Learning, second-order and first-order.

Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
ICML 2017. This file implements Algorithm 2 (MAML for few-shot supervised learning):

    Alg. 2 line 3     sample a batch of tasks T_i ~ p(T)          train(): problem.sample("train", ...)
    Alg. 2 lines 5-7  θ'_i = θ − α ∇θ L_Ti(f_θ) on K examples      adapt()
    Alg. 2 line 8     sample D'_i, the query set of each task       the same call (x_query, y_query)
    Alg. 2 line 10    θ ← θ − β ∇θ Σ_i L_Ti(f_θ'_i) (Adam)          meta_step()
    §5.2              first-order MAML drops the second derivatives: adapt(first_order=True)
    Alg. 3 (§3.2)     meta-RL: adapt_policy(), adapt() on the REINFORCE loss; rl.py does the rest (--env)

Symbols, named the same in every script of this project:
    θ   params           meta-parameters, a dict of tensors
    θ'  fast             adapted parameters, one copy per task (leading dimension T)
    α   inner_lr         inner-loop step size
    β   outer_lr         step size of the meta-update (Adam)
    N   ways             classes per task
    K   shots            support examples per class (regression: points per task)
    Q   query            query examples per class for the meta-update (D'_i)
    T   meta_batch_size  tasks per meta-update

Run:    python maml.py            (sinusoid regression, CPU, about 2.5 minutes; --help lists every flag)
        python maml.py --env navigation2d   (meta-RL, Alg. 3; see rl.py)
"""

import argparse
import math
import sys
import time
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

import data


# ---------------------------------------------------------------------------------------------
# The paper's settings (§5.1, Appendix A.1)
# ---------------------------------------------------------------------------------------------
# The values as the paper prints them. paper_settings() converts α to the step that produced the
# paper's numbers (README: the α convention, with the measurements behind it). Our losses are means;
# cbfinn/maml's classification losses are sums divided by K, so its α is N·α here.
PAPER_SETTINGS = {
    # §5.1: 1 step, α = 0.01, K = 10, Adam; the reference code: meta-batch 25, β = 1e-3, 70k iterations
    "sinusoid": dict(shots=10, query=10, inner_lr=0.01, inner_steps=1, eval_steps=10,
                     meta_batch_size=25, outer_lr=1e-3, iterations=70000),
    # A.1: 5-way: 1 step, α = 0.4, meta-batch 32, 3 steps at test, 60k iterations; Q = K (the reference code)
    "omniglot-5way": dict(inner_lr=0.4, inner_steps=1, eval_steps=3, meta_batch_size=32,
                          outer_lr=1e-3, iterations=60000),
    # A.1: 20-way: 5 steps, α = 0.1, meta-batch 16, evaluated with 5 steps
    "omniglot-20way": dict(inner_lr=0.1, inner_steps=5, eval_steps=5, meta_batch_size=16,
                           outer_lr=1e-3, iterations=60000),
    # A.1: 5 steps, α = 0.01, 10 steps at test, 15 queries per class, meta-batch 4 (1-shot) / 2 (5-shot);
    # the reference code clips the meta-gradient to ±10 here (cbfinn/maml maml.py, clip_by_value)
    "miniimagenet": dict(inner_lr=0.01, inner_steps=5, eval_steps=10, query=15,
                         outer_lr=1e-3, iterations=60000, clip_grad=10.0),
}
# The sinusoid's α as the authors ran it: cbfinn/maml's command for §5.1 sets no --update_lr, so it
# runs at that flag's default, 1e-3 (its MSE is a mean, as ours). The printed 0.01 leaves a third or
# more of the test tasks past the later steps' stability limit (README: why more steps looked worse).
SINUSOID_AUTHORS_LR = 1e-3


# ---------------------------------------------------------------------------------------------
# The functional models. Params carry a leading task dimension T, so a meta-batch is one batched
# computation: x (T, B, ...) -> (T, B, outputs).
# ---------------------------------------------------------------------------------------------

def init_mlp(sizes, generator):
    """The 1-40-40-1 ReLU regressor of §5.1, with nn.Linear's uniform initialization."""
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        bound = 1.0 / math.sqrt(n_in)
        params[f"fc{i}.w"] = (torch.rand(n_in, n_out, generator=generator) * 2 - 1) * bound
        params[f"fc{i}.b"] = (torch.rand(n_out, generator=generator) * 2 - 1) * bound
    return params


def mlp_forward(params, x):
    """x: (T, B, inputs) -> (T, B, outputs)."""
    layers = len(params) // 2
    h = x
    for i in range(1, layers + 1):
        h = torch.baddbmm(params[f"fc{i}.b"].unsqueeze(1), h, params[f"fc{i}.w"])
        if i < layers:
            h = F.relu(h)
    return h


def init_convnet(in_channels, hidden, ways, feature_dim, generator):
    """The 4-block network of §5.2 (Vinyals et al. 2016): 3x3 conv, BatchNorm, ReLU.
    No conv bias: BatchNorm's β absorbs it."""
    params = {}
    c_in = in_channels
    for i in range(1, 5):
        fan_in = c_in * 9
        params[f"conv{i}.w"] = torch.randn(hidden, c_in, 3, 3, generator=generator) * math.sqrt(2.0 / fan_in)
        params[f"bn{i}.w"] = torch.ones(hidden)
        params[f"bn{i}.b"] = torch.zeros(hidden)
        c_in = hidden
    bound = 1.0 / math.sqrt(feature_dim)
    params["fc.w"] = (torch.rand(feature_dim, ways, generator=generator) * 2 - 1) * bound
    params["fc.b"] = torch.zeros(ways)
    return params


def batch_norm(h, weight, bias, eps=1e-5):
    """BatchNorm with the batch's own statistics in training and at test time (transductive), as the
    reference code; no running statistics. h: (B, T*C, H, W): each task's channels get their own."""
    return F.batch_norm(h, None, None, weight, bias, training=True, eps=eps)


def conv_body(params, x, max_pool, activations=None):
    """The four conv blocks: x (T, B, C, H, W) -> features (T, B, D), the T tasks side by side as the
    channel groups of one grouped convolution. Omniglot (max_pool=False): 64 filters, stride-2 convs,
    the global average -> 64-d. MiniImageNet: 32 filters, 2x2 max-pools, flattened -> 800-d.
    A list given as `activations` collects each block's output (T, B, C, H, W) (anil.py's CCA/CKA).
    It equals `for t in range(T): conv2d(x[t], w[t]) -> batch_norm -> relu` per task, each with its own
    BatchNorm statistics: tests/test_maml.py::test_batched_tasks_equal_one_task_at_a_time (float64)."""
    T, B = x.shape[:2]
    h = x.transpose(0, 1).reshape(B, T * x.shape[2], *x.shape[3:])   # (B, T*C, H, W)
    for i in range(1, 5):
        w = params[f"conv{i}.w"]                                     # (T, C_out, C_in, 3, 3)
        h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), stride=1 if max_pool else 2, padding=1, groups=T)
        h = F.relu(batch_norm(h, params[f"bn{i}.w"].reshape(-1), params[f"bn{i}.b"].reshape(-1)))
        if max_pool:
            h = F.max_pool2d(h, 2)
        if activations is not None:
            activations.append(h.reshape(B, T, -1, *h.shape[2:]).transpose(0, 1))
    if max_pool:
        return h.reshape(B, T, -1).transpose(0, 1)                   # (T, B, C*H*W)
    return h.mean(dim=(2, 3)).reshape(B, T, -1).transpose(0, 1)      # (T, B, C)


def conv_forward(params, x, max_pool):
    """x: (T, B, C, H, W) -> logits (T, B, N): the conv blocks, then the linear head."""
    return torch.baddbmm(params["fc.b"].unsqueeze(1), conv_body(params, x, max_pool), params["fc.w"])


def per_task(params, tasks):
    """θ seen by each of T tasks: (T, *shape) views, whose gradients flow back into θ."""
    return {k: v.expand(tasks, *v.shape) for k, v in params.items()}


def mse_per_task(out, y):
    """Eq. (2) averaged over the examples: (T, B, 1), (T, B, 1) -> (T,)."""
    return ((out - y) ** 2).mean(dim=(1, 2))


def cross_entropy_per_task(out, y):
    """Cross-entropy (Eq. 3 for N classes) averaged over the examples: (T, B, N), (T, B) -> (T,)."""
    T, B, N = out.shape
    return F.cross_entropy(out.reshape(T * B, N), y.reshape(T * B), reduction="none").reshape(T, B).mean(1)


def accuracy_per_task(out, y):
    return (out.argmax(-1) == y).float().mean(1)


# ---------------------------------------------------------------------------------------------
# The algorithm: inner loop (Alg. 2 lines 5-7) and meta-update (line 10)
# ---------------------------------------------------------------------------------------------

def adapt(params, net, loss_fn, x, y, inner_steps, inner_lr, first_order):
    """θ'_i for every task of the batch at once. params: (T, ...) tensors, one copy of θ per task.
    The tasks never mix (separate channel groups and BatchNorm statistics), so the gradient
    of the summed loss with respect to copy i is task i's own gradient ∇θ L_Ti(f_θ)."""
    fast = params
    for _ in range(inner_steps):
        # Alg. 2 lines 5-6: ∇θ L_Ti(f_θ) on the K support examples D
        inner_loss = loss_fn(net(fast, x), y).sum()
        # Second-order MAML keeps this gradient's graph so that the meta-gradient differentiates
        # through it (Hessian-vector products); first-order MAML (§5.2) treats it as a constant,
        # so that ∇θ L(θ') becomes ∇θ' L(θ').
        grads = torch.autograd.grad(inner_loss, list(fast.values()), create_graph=not first_order)
        # Alg. 2 line 7: θ' = θ − α ∇θ L_Ti(f_θ)
        fast = {k: w - inner_lr * g for (k, w), g in zip(fast.items(), grads)}
    return fast


def meta_loss(params, problem, batch, cfg, inner_loop=adapt):
    """Σ_i L_Ti(f_θ'_i) on the query sets D'_i (Alg. 2 line 10), averaged over the T tasks as the
    reference code does, and the per-task query metric. anil.py passes its inner loop as `inner_loop`."""
    x_s, y_s, x_q, y_q = batch
    fast = inner_loop(per_task(params, x_s.shape[0]), problem.forward, problem.loss, x_s, y_s,
                 cfg.inner_steps, cfg.inner_lr, cfg.first_order)
    out = problem.forward(fast, x_q)
    return problem.loss(out, y_q).mean(), problem.metric(out.detach(), y_q)


def meta_step(params, optimizer, problem, batch, cfg, inner_loop=adapt):
    """Alg. 2 line 10: θ ← θ − β ∇θ Σ_i L_Ti(f_θ'_i), with Adam. Returns the meta-loss and metric."""
    optimizer.zero_grad(set_to_none=True)
    loss, metric = backward_meta_loss(params, problem, batch, cfg, inner_loop)   # ∇θ Σ_i L_Ti(f_θ'_i) in .grad
    optimizer.step()                                                             # θ ← θ − β Adam(∇θ)
    return loss, metric


# ---------------------------------------------------------------------------------------------
# Evaluation: the adaptation curve on unseen tasks (Fig. 3), mean ± 95% CI; §5.1's baseline
# ---------------------------------------------------------------------------------------------

def adaptation_curve(params, problem, batches, inner_lr, eval_steps, bn_mode="transductive", inner_loop=adapt):
    """Per-task metric after 0, 1, ..., eval_steps inner steps: a (steps+1, tasks) array."""
    rows = [[] for _ in range(eval_steps + 1)]
    for x_s, y_s, x_q, y_q in batches:
        fast = {k: v.detach().requires_grad_() for k, v in per_task(params, x_s.shape[0]).items()}
        for step in range(eval_steps + 1):
            if step > 0:
                fast = inner_loop(fast, problem.forward, problem.loss, x_s, y_s, 1, inner_lr, first_order=True)
            with torch.no_grad():
                rows[step].append(problem.metric(predict(fast, problem.forward, x_s, x_q, bn_mode), y_q).cpu())
    return torch.stack([torch.cat(r) for r in rows]).numpy()


def evaluate(params, problem, split, tasks, seed, cfg, inner_loop=adapt):
    """The adaptation curve on a fixed, seeded set of tasks of `split` (seed + 1 val, seed + 2 test)."""
    batches = data.task_batches(problem, split, tasks, cfg.eval_chunk, seed)
    return adaptation_curve(params, problem, batches, cfg.inner_lr, cfg.eval_steps, cfg.bn_mode, inner_loop)


def predict(fast, forward, x_s, x_q, bn_mode):
    """Query outputs (T, N*Q, ...). transductive: one forward pass over the whole query batch,
    whose BatchNorm statistics mix the queries, as the reference code does. nontransductive
    (Reptile §6.1): each query is classified in a batch of the support set plus itself alone."""
    if bn_mode == "transductive":
        return forward(fast, x_q)
    T, S, M = x_s.shape[0], x_s.shape[1], x_q.shape[1]
    groups = torch.cat([x_s.unsqueeze(1).expand(T, M, *x_s.shape[1:]),
                        x_q.unsqueeze(2)], dim=2)                    # (T, M, S+1, ...)
    groups = groups.reshape(T * M, S + 1, *x_s.shape[2:])
    fast_g = {k: v.repeat_interleave(M, dim=0) for k, v in fast.items()}
    out = forward(fast_g, groups)[:, -1]                             # (T*M, outputs): the query's row
    return out.reshape(T, M, *out.shape[1:])


# ---------------------------------------------------------------------------------------------
# Alg. 3's inner loop (meta-RL): rl.py samples the trajectories and takes the TRPO meta-step
# ---------------------------------------------------------------------------------------------

def adapt_policy(params, episodes, inner_lr, first_order):
    """Alg. 3 lines 6-7: θ'_i = θ − α ∇θ L_Ti(f_θ), one REINFORCE step on every policy parameter
    (the mean network and log σ), on the K trajectories D_i with their advantages."""
    import rl     # meta-RL only: rl.py needs gymnasium, which the supervised scripts do not
    return adapt(params, rl.policy_forward, rl.reinforce_loss, rl.flat_obs(episodes), episodes,
                 1, inner_lr, first_order)


def pretrain_step(params, optimizer, problem, batch):
    """Plain regression onto random sinusoids: no inner loop, so the network learns the mean
    output over tasks (App. C.1)."""
    x_s, y_s, x_q, y_q = batch
    x, y = torch.cat([x_s, x_q], 1), torch.cat([y_s, y_q], 1)
    loss = problem.loss(problem.forward(per_task(params, x.shape[0]), x), y).mean()
    if not torch.isfinite(loss):
        raise data.NonFiniteLoss(f"the pretraining loss is {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


FINE_TUNE_LRS = (0.001, 0.003, 0.01, 0.02, 0.05, 0.1, 0.2)


SINUSOID_EVAL_SHOTS = (5, 10, 20)


SINUSOID_EVAL_POINTS = 100   # query points per test task; the MSE's expectation does not depend on it


def sinusoid_table(cfg, problem, maml_params, pretrained_params):
    """MSE after 0..eval_steps steps for K = 5, 10, 20: MAML (with its α) against the pretrained
    network (with the α that did best on separate validation tasks, the paper's 'automatically
    tuned step size'). Both see the same test tasks."""
    results = {}
    for K in SINUSOID_EVAL_SHOTS:
        def tasks(split, n, seed):
            return data.task_batches(problem, split, n, cfg.eval_chunk, seed, shots=K, query=SINUSOID_EVAL_POINTS)
        entry = {"maml": adaptation_curve(maml_params, problem, tasks("test", cfg.test_tasks, cfg.seed + 2),
                                          cfg.inner_lr, cfg.eval_steps)}
        if pretrained_params is not None:
            score = {lr: adaptation_curve(pretrained_params, problem, tasks("val", cfg.val_tasks, cfg.seed + 1),
                                          lr, cfg.eval_steps)[-1].mean() for lr in FINE_TUNE_LRS}
            best = min(score, key=score.get)
            entry["pretrained"] = adaptation_curve(pretrained_params, problem, tasks("test", cfg.test_tasks, cfg.seed + 2),
                                                   best, cfg.eval_steps)
            entry["pretrained_lr"] = best
        results[K] = entry
    return results


# ---- Below: what the paper does not contain: command line, data, checkpoints, training loop, plots ----

# task_chunk and eval_chunk change speed and memory only, not the result: how many tasks run as
# one batched computation, measured with tests/benchmark.py on one CPU thread. Omniglot: chunks of 4
# were as fast as 32 (5-way) and faster than 1 or 2 (20-way), with a graph of 4 tasks in memory;
# for 84x84 images one task at a time is as fast, and non-transductive evaluation of 75 queries
# needs 75 BatchNorm groups per task.
CHUNKS = {"sinusoid": dict(task_chunk=25, eval_chunk=100), "omniglot-5way": dict(task_chunk=4, eval_chunk=50),
          "omniglot-20way": dict(task_chunk=4, eval_chunk=10), "miniimagenet": dict(task_chunk=1, eval_chunk=1)}
# `python maml.py` with no arguments takes about 2.5 minutes on one CPU thread (README); --full
# gives the paper's 70k iterations.
QUICK_SINUSOID_ITERATIONS = 30000


def paper_settings(dataset, ways, shots):
    """PAPER_SETTINGS for a dataset in our convention, with the batching of CHUNKS (speed only).
    cbfinn/maml's inner loss is the cross-entropy summed over the N·K support examples and divided by K,
    N times our mean, so its α is N·α here. Its outer loss sums over the N·Q queries, divided by K:
    N·Q/K times ours, so its ±10 clip is ±10·K/(N·Q) here. The sinusoid's α is the authors' code's
    default, SINUSOID_AUTHORS_LR."""
    if dataset == "omniglot":
        key = "omniglot-20way" if ways >= 20 else "omniglot-5way"
    else:
        key = dataset if dataset == "sinusoid" else "miniimagenet"   # also the default for an image folder
    s = {**PAPER_SETTINGS[key], **CHUNKS[key]}
    if dataset == "omniglot":
        s["query"] = shots
    elif dataset != "sinusoid":
        s["meta_batch_size"] = 4 if shots == 1 else 2
    s["inner_lr"] = SINUSOID_AUTHORS_LR if dataset == "sinusoid" else round(ways * s["inner_lr"], 12)
    if "clip_grad" in s:
        s["clip_grad"] = round(s["clip_grad"] * shots / (ways * s["query"]), 12)
    return s


def conv_feature_dim(image_size, hidden, max_pool):
    size = image_size
    for _ in range(4):
        size = size // 2 if max_pool else (size + 1) // 2
    return hidden * size * size if max_pool else hidden


def build_parser():
    p = argparse.ArgumentParser(
        description="MAML and first-order MAML (Finn et al. 2017). Flags left unset take the "
                    "paper's value for the chosen dataset (Appendix A.1, §5.1).",
        allow_abbrev=False, formatter_class=data.HelpFormatter)
    a = p.add_argument
    data.add_dataset_flags(p, "sinusoid (§5.1), omniglot / miniimagenet (§5.2)")
    a("--ways", type=int, default=5, help="N, classes per task (paper: 5 or 20)")
    a("--shots", type=int, default=None, help="K, support examples per class (paper: 1 or 5; sinusoid: 10 points)")
    a("--query", type=int, default=None, help="Q, query examples per class for the meta-update "
      "(paper: K on Omniglot, 15 on MiniImageNet, 10 sinusoid points)")
    a("--inner-lr", type=float, default=None, help="α, inner step size, for a loss averaged over the support set "
      "(default: the authors' step, N × the paper's printed α, whose loss is N times ours: Omniglot 5-way 2.0 "
      "(printed 0.4), 20-way 2.0 (printed 0.1), MiniImageNet 5-way 0.05 (printed 0.01); sinusoid 0.001, the "
      "authors' code's default (printed 0.01; a mean MSE in both))")
    a("--inner-steps", type=int, default=None, help="inner gradient steps in training (paper: 1, 5 for 20-way and MiniImageNet)")
    a("--eval-steps", type=int, default=None, help="inner steps at test time (paper: 10 sinusoid, 3 / 5 Omniglot, 10 MiniImageNet)")
    a("--outer-lr", type=float, default=None, help="β, Adam step size of the meta-update (paper code: 1e-3)")
    a("--meta-batch-size", type=int, default=None, help="T, tasks per meta-update (paper: 25 sinusoid, 32 / 16 Omniglot, 4 / 2 MiniImageNet)")
    a("--clip-grad", type=float, default=None, help="clip each meta-gradient entry to ±this before Adam "
      "(cbfinn/maml: 10 on MiniImageNet for its summed loss, which is ±10·K/(N·Q) for our mean: the default "
      "there; none on Omniglot and the sinusoid; the paper does not say)")
    a("--first-order", action="store_true", help="first-order MAML (§5.2): the inner gradient is a constant, "
      "no second derivatives (anil.py, nil.py: the head's inner gradient)")
    a("--iterations", type=int, default=None, help=f"meta-iterations (default: {QUICK_SINUSOID_ITERATIONS} for "
      "the sinusoid, the paper's 60000 for classification)")
    a("--full", action="store_true", help="the paper's length: 70000 sinusoid iterations")
    a("--sinusoid-variant", choices=["maml", "reptile"], default="maml",
      help="maml: phase U[0, π] (§5.1); reptile: phase U[0, 2π], query = 50 even points (Reptile §4)")
    a("--no-baseline", action="store_true", help="maml.py sinusoid: skip the 'pretrained on all tasks' baseline of §5.1")
    a("--val-every", type=int, default=None, help="validate every this many iterations (default: iterations / 10)")
    a("--val-tasks", type=int, default=100, help="validation tasks per validation")
    a("--test-tasks", type=int, default=600, help="meta-test tasks (paper: 600), reported as mean ± 95%% CI")
    a("--task-chunk", type=int, default=None, help="tasks of a meta-batch adapted together as one batched "
      "computation (speed and memory only; the meta-gradient is the same)")
    a("--eval-chunk", type=int, default=None, help="tasks adapted together during evaluation (speed and memory only)")
    a("--bn-mode", choices=["transductive", "nontransductive"], default="transductive",
      help="BatchNorm statistics at test time: of the whole query batch, as the reference code does "
      "(transductive), or of the support set plus one query at a time (Reptile §6.1)")
    data.add_session_flags(p, "--iterations, --inner-lr, --outer-lr")
    a("--plot", nargs="?", const="auto", default=None, help="save a figure (maml.py: the sinusoid "
      "of Fig. 2 or the adaptation curve; anil.py: the --similarity bars); needs matplotlib")
    a("--env", default=None, help="meta-RL instead (Alg. 3, §5.3): navigation2d, halfcheetah-dir, halfcheetah-vel, "
      "ant-dir or ant-vel; `--env NAME --help` lists the meta-RL flags")
    return p


def finalize_config(cfg):
    """Fill unset flags with the paper's settings and reject impossible combinations."""
    data.check_session_flags(cfg)
    if cfg.shots is None:
        cfg.shots = 10 if cfg.dataset == "sinusoid" else 1
    if cfg.dataset == "sinusoid" and cfg.iterations is None and not cfg.full:
        cfg.iterations = QUICK_SINUSOID_ITERATIONS      # an explicit --iterations always wins
    for k, v in paper_settings(cfg.dataset, cfg.ways, cfg.shots).items():
        if getattr(cfg, k, None) is None:
            setattr(cfg, k, v)
    if cfg.val_every is None:
        cfg.val_every = max(1, cfg.iterations // 10)
    return cfg


def make_problem(cfg, device, splits=None):
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.dataset == "sinusoid":
        def sample(split, tasks, generator, shots=None, query=None):
            b = data.sinusoid_tasks(tasks, shots or cfg.shots, query or cfg.query, generator,
                                    cfg.sinusoid_variant, device)
            return b["x_support"], b["y_support"], b["x_query"], b["y_query"]
        return data.Problem(init_mlp([1, 40, 40, 1], g), mlp_forward, mse_per_task, mse_per_task, "mse", sample)

    samplers = {}
    for name, split in splits.items():
        if name == "val" and split.num_classes < cfg.ways:
            print(f"note: the val split has {split.num_classes} classes, fewer than ways={cfg.ways}; "
                  f"validation is skipped" + (" (--rotate-eval adds rotated val/test classes)"
                                              if cfg.dataset == "omniglot" else ""))
            continue
        samplers[name] = data.EpisodeSampler(split, cfg.ways, cfg.shots, cfg.query, device, name,
                                             cfg.rotate_tasks)
    size, channels, _ = data.image_format(cfg)
    max_pool = cfg.dataset != "omniglot"
    hidden = 64 if cfg.dataset == "omniglot" else 32
    params = init_convnet(channels, hidden, cfg.ways, conv_feature_dim(size, hidden, max_pool), g)

    def forward(p, x):
        return conv_forward(p, x, max_pool)

    def sample(split, tasks, generator):
        return samplers[split].sample(tasks, generator)
    return data.Problem(params, forward, cross_entropy_per_task, accuracy_per_task, "acc", sample,
                        has_val="val" in samplers, splits=splits)


def setup(cfg, saved):
    """Print the config, seed, load the data and build the problem. The starting state is the
    checkpoint, if its parameters fit this model, or θ at initialization. anil.py and nil.py start so too."""
    print("config: " + " ".join(f"{k}={v}" for k, v in vars(cfg).items()))
    data.seed_everything(cfg.seed)
    try:
        problem = make_problem(cfg, torch.device(cfg.device), data.load_splits(cfg))
    except data.DataError as e:
        raise SystemExit(f"error: {e}") from None
    if not saved:
        return problem, {"params": problem.params, "iteration": 0}
    data.check_fit(saved, problem.params, cfg)
    return problem, saved


def classify(params, problem, cfg, x_s, y_s, x_q, inner_loop=adapt):
    """--predict: class probabilities (T, M, N) of the queries after the test-time inner loop on the
    support set (eval_steps steps of α, first order as at test), with --bn-mode's BatchNorm batches."""
    fast = {k: v.detach().requires_grad_() for k, v in per_task(params, x_s.shape[0]).items()}
    fast = inner_loop(fast, problem.forward, problem.loss, x_s, y_s, cfg.eval_steps, cfg.inner_lr, first_order=True)
    with torch.no_grad():
        return predict(fast, problem.forward, x_s, x_q, cfg.bn_mode).softmax(-1)


def train(cfg, problem, state, inner_loop=adapt, algorithm="maml"):
    """Alg. 2: meta-train θ (and, for the sinusoid, the pretrained baseline beside it). anil.py
    and nil.py train with this loop and ANIL's inner loop as `inner_loop`."""
    device = torch.device(cfg.device)
    params = {k: v.detach().clone().to(device).requires_grad_() for k, v in state["params"].items()}
    optimizer = torch.optim.Adam(params.values(), lr=cfg.outer_lr)
    task_gen = torch.Generator().manual_seed(cfg.seed)
    baseline = "baseline_params" in state       # the sinusoid's pretrained network, trained alongside
    if baseline:
        b_params = {k: v.detach().clone().to(device).requires_grad_() for k, v in state["baseline_params"].items()}
        b_optimizer = torch.optim.Adam(b_params.values(), lr=cfg.outer_lr)
        b_gen = torch.Generator().manual_seed(cfg.seed + 100)
    if "optimizer" in state:  # resuming
        optimizer.load_state_dict(state["optimizer"])
        optimizer.param_groups[0]["lr"] = cfg.outer_lr          # a --resume may lower β
        task_gen.set_state(state["rng"]["tasks"])
        if baseline:
            b_optimizer.load_state_dict(state["baseline_optimizer"])
            b_optimizer.param_groups[0]["lr"] = cfg.outer_lr
            b_gen.set_state(state["rng"]["baseline_tasks"])
    history = state.get("history", [])
    running = state.get("running")   # smoothed training loss and metric, for the bar and the log

    def validate():
        line = {"train_loss": round(running[0], 5), f"train_{problem.metric_name}": round(running[1], 5)}
        if problem.has_val:
            curve = evaluate(params, problem, "val", cfg.val_tasks, cfg.seed + 1, cfg, inner_loop)
            line[f"val_{problem.metric_name}"] = round(float(curve[-1].mean()), 5)
        return line

    def checkpoint(iteration):
        out = {"algorithm": algorithm, "format": data.CHECKPOINT_FORMAT,
               "params": {k: v.detach().cpu() for k, v in params.items()}, "optimizer": optimizer.state_dict(),
               "config": vars(cfg), "iteration": iteration,
               "rng": {"tasks": task_gen.get_state()}, "history": history, "running": running}
        if baseline:
            out["baseline_params"] = {k: v.detach().cpu() for k, v in b_params.items()}
            out["baseline_optimizer"] = b_optimizer.state_dict()
            out["rng"]["baseline_tasks"] = b_gen.get_state()
        return out

    # the progress bar, validation, checkpoints and stops: data.Training
    with data.Training(cfg, state["iteration"], history, validate, checkpoint, f"{algorithm} meta-train",
                       "--inner-lr or --outer-lr") as loop:
        for it in loop:                                                   # Alg. 2 line 2: while not done
            # lines 3 and 8: a batch of tasks, each with its support and query sets (torchrun: this rank's slice)
            batch = data.rank_tasks(problem.sample("train", cfg.meta_batch_size, task_gen))
            # lines 4-7: θ'_i = inner_loop(θ) on each support set (in meta_loss); line 10: the Adam step
            loss, metric = meta_step(params, optimizer, problem, batch, cfg, inner_loop)
            if baseline:
                pretrain_step(b_params, b_optimizer, problem, problem.sample("train", cfg.meta_batch_size, b_gen))
            running = (loss, metric) if running is None else (0.98 * running[0] + 0.02 * loss,
                                                              0.98 * running[1] + 0.02 * metric)
            loop.show({"loss": f"{running[0]:.4f}", problem.metric_name: f"{running[1]:.4f}"})
    return loop.state


def print_sinusoid_table(results, eval_steps):
    steps = [s for s in (0, 1, 5, 10) if s <= eval_steps]
    paper = {("maml", 5): "0.67 / 0.38 / 0.35", ("pretrained", 5): "2.41 / 2.23 / 2.19"}
    print("\nSinusoid regression, MSE ± 95% CI after k fine-tuning steps (MAML Table 2 / Fig. 6)")
    print(f"{'K':>3} {'model':<11} " + " ".join(f"{'k=' + str(s):>15}" for s in steps) + "   paper k=1/5/10")
    for K, entry in results.items():
        for name in ("maml", "pretrained"):
            if name in entry:
                cells = " ".join(f"{m:7.3f} ± {c:5.3f}" for m, c in (data.mean_ci(entry[name][s]) for s in steps))
                print(f"{K:>3} {name:<11} {cells}   {paper.get((name, K), '')}")
    if "pretrained_lr" in next(iter(results.values())):
        print("pretrained fine-tuning α (tuned on validation tasks): "
              + ", ".join(f"K={K}: {e['pretrained_lr']}" for K, e in results.items()))


def backward_meta_loss(params, problem, batch, cfg, inner_loop=adapt):
    """meta_step's gradient, ∇θ of the meta-loss averaged over the tasks, left in θ's .grad. How,
    which the paper does not need to say: `task_chunk` tasks at a time, each chunk's graph freed by
    its own backward pass (the same gradient for any chunk size); under torchrun, averaged over every
    rank's tasks; a non-finite loss refused before it can reach θ; clipped where --clip-grad says."""
    tasks = batch[0].shape[0]
    chunk = cfg.task_chunk or tasks
    total, metrics = 0.0, []
    for start in range(0, tasks, chunk):
        part = tuple(b[start:start + chunk] for b in batch)
        loss, metric = meta_loss(params, problem, part, cfg, inner_loop)
        weight = part[0].shape[0] / tasks           # chunk means -> the mean over the meta-batch
        (loss * weight).backward()
        total += loss.item() * weight
        metrics.append(metric)
    stats = torch.tensor([total, torch.cat(metrics).mean().item()], dtype=torch.float64, device=batch[0].device)
    data.all_reduce_mean([p.grad for p in params.values()] + [stats], tasks)   # torchrun: all ranks' tasks
    if not torch.isfinite(stats[0]):            # checked after the all_reduce, so that every rank stops
        raise data.NonFiniteLoss(f"the meta-loss is {stats[0].item()}")
    if getattr(cfg, "clip_grad", None):         # the reference code's MiniImageNet setting
        for p in params.values():
            p.grad.clamp_(-cfg.clip_grad, cfg.clip_grad)
    return stats[0].item(), stats[1].item()


def top_curvature(params, forward, loss_fn, x, y, generator, iterations=100):
    """λ, the eigenvalue of largest magnitude of each task's support-loss Hessian at params (T, ...):
    power iteration on Hessian-vector products, all tasks at once. A step of α on a quadratic moves
    away from the minimum along an eigenvector whose αλ > 2, by |1 − αλ| per step."""
    fast = {k: v.detach().requires_grad_() for k, v in params.items()}
    grads = torch.autograd.grad(loss_fn(forward(fast, x), y).sum(), list(fast.values()), create_graph=True)
    T = x.shape[0]

    def per_task_dot(a, b):
        return sum((u * w).reshape(T, -1).sum(1) for u, w in zip(a, b))
    v = [torch.randn(g.shape, generator=generator, dtype=g.dtype) for g in grads]
    for _ in range(iterations):
        norm = per_task_dot(v, v).sqrt()
        v = [u / norm.reshape(-1, *[1] * (u.dim() - 1)) for u in v]
        hv = torch.autograd.grad(grads, list(fast.values()), v, retain_graph=True)
        lam = per_task_dot(hv, v)            # the Rayleigh quotient of the unit vector v
        v = [h.detach() for h in hv]
    return lam.detach()


def diagnose_worse_tasks(cfg, problem, params, curve, shots=5):
    """Why a few test tasks get worse with more steps (README, sinusoid): the tasks whose MSE after
    the last step is at least twice that after the first, and the curvature λ of their support loss at θ'_1.
    curve: sinusoid_table's MAML curve for these shots. Returns (curve, worse task indices, λ at θ'_1)."""
    batches = list(data.task_batches(problem, "test", cfg.test_tasks, cfg.eval_chunk, cfg.seed + 2,
                                     shots=shots, query=SINUSOID_EVAL_POINTS))
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    theta = {k: v.detach().requires_grad_() for k, v in per_task(params, x.shape[0]).items()}
    one_step = adapt(theta, problem.forward, problem.loss, x, y, 1, cfg.inner_lr, first_order=True)
    lam = top_curvature(one_step, problem.forward, problem.loss, x, y, torch.Generator().manual_seed(cfg.seed))
    worse = (curve[-1] >= 2 * curve[1]).nonzero()[0]
    return curve, worse, lam.cpu().numpy()


def print_diagnosis(cfg, curve, worse, lam, shots=5):
    """Prints diagnose_worse_tasks' finding and returns it for the results file."""
    edge = lam * cfg.inner_lr > 2
    rest = [i for i in range(curve.shape[1]) if i not in set(worse.tolist())]
    d = {"K": shots, "tasks": int(curve.shape[1]), "worse_tasks": len(worse), "worse_with_edge": int(edge[worse].sum()),
         "edge_tasks": int(edge.sum()), "mean_without_worse": [float(curve[1][rest].mean()), float(curve[-1][rest].mean())],
         "median": [float(np.median(curve[1])), float(np.median(curve[-1]))]}
    print(f"K = {shots}: {d['worse_tasks']} of {d['tasks']} test tasks are at least twice as bad after {cfg.eval_steps} "
          f"steps as after 1, {d['worse_with_edge']} of them with αλ > 2 at θ'_1 ({d['edge_tasks']} of all tasks); λ: the "
          f"top curvature of the support loss, α = {cfg.inner_lr}. Without them, MSE after 1 / {cfg.eval_steps} steps: "
          "{:.3f} / {:.3f}; median of all: {:.3f} / {:.3f}".format(*d["mean_without_worse"], *d["median"]))
    return d


def plot_sinusoid(path, cfg, problem, maml_params, pretrained_params, pretrained_lr, tasks=3):
    """MAML Fig. 2: random test sinusoids (one per row), K = 5 points, each model before
    adaptation and after 1 and 10 steps."""
    b = data.sinusoid_tasks(tasks, 5, 1, torch.Generator().manual_seed(cfg.seed + 3), cfg.sinusoid_variant)
    grid = torch.linspace(-5, 5, 200).reshape(1, 200, 1).expand(tasks, 200, 1)
    truth = b["amplitude"][:, None, None] * torch.sin(grid - b["phase"][:, None, None])
    models = [("MAML", maml_params, cfg.inner_lr)]
    if pretrained_params is not None:
        models.append((f"pretrained, step size {pretrained_lr}", pretrained_params, pretrained_lr))
    columns = []
    for name, params, lr in models:
        on_cpu = {k: v.detach().cpu() for k, v in params.items()}
        fast = {k: v.requires_grad_() for k, v in per_task(on_cpu, tasks).items()}
        curves = []
        for step in range(11):
            if step in (0, 1, 10):
                with torch.no_grad():
                    curves.append(("pre-update" if step == 0 else f"{step} grad step" + "s" * (step > 1),
                                   "--" if step == 0 else "-", mlp_forward(fast, grid)))
            fast = adapt(fast, mlp_forward, mse_per_task, b["x_support"], b["y_support"], 1, lr, True)
        columns.append((name, curves))
    data.plot_fits(path, grid, truth, b["x_support"], b["y_support"], columns)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    data.keep_freed_memory()
    if any(a == "--env" or a.startswith("--env=") for a in argv):
        import rl     # only here: the supervised runs need no gymnasium
        return rl.main(argv, adapt_policy, "maml", "maml.py")
    cfg, saved, _ = data.parse_args(build_parser(), argv, "maml")
    cfg = finalize_config(cfg)
    data.setup_distributed(cfg, "maml.py")
    problem, state = setup(cfg, saved)
    if not saved and cfg.dataset == "sinusoid" and not cfg.no_baseline:
        state["baseline_params"] = init_mlp([1, 40, 40, 1], torch.Generator().manual_seed(cfg.seed + 100))
    device = torch.device(cfg.device)
    if cfg.predict:
        params = {k: v.to(device) for k, v in state["params"].items()}
        return data.run_predict(cfg, partial(classify, params, problem, cfg))
    started = time.time()
    if not cfg.eval_only:
        state = train(cfg, problem, state)
    if data.RANK != 0:       # torchrun: rank 0 alone tests and writes
        return None
    train_seconds = time.time() - started
    params = {k: v.to(device) for k, v in state["params"].items()}
    results = {"config": vars(cfg), "train_seconds": round(train_seconds, 1),
               "iteration": state["iteration"], "history": state.get("history", [])}

    if cfg.dataset == "sinusoid":
        pretrained = state.get("baseline_params")
        pretrained = {k: v.to(device) for k, v in pretrained.items()} if pretrained else None
        table = sinusoid_table(cfg, problem, params, pretrained)
        print_sinusoid_table(table, cfg.eval_steps)
        if cfg.eval_steps > 1:
            results["diagnosis"] = print_diagnosis(cfg, *diagnose_worse_tasks(cfg, problem, params, table[5]["maml"]))
        results["test"] = {f"K={K}": {name: [data.mean_ci(r) for r in curve] for name, curve in entry.items()
                                      if name != "pretrained_lr"} | {"pretrained_lr": entry.get("pretrained_lr")}
                           for K, entry in table.items()}
    else:
        curve = evaluate(params, problem, "test", cfg.test_tasks, cfg.seed + 2, cfg)
        print(f"\nmeta-test: {cfg.test_tasks} tasks, {cfg.ways}-way {cfg.shots}-shot, "
              f"{cfg.bn_mode} BatchNorm, accuracy ± 95% CI after k steps (α = {cfg.inner_lr}):")
        print("  " + data.format_curve(curve))
        m, c = data.mean_ci(curve[-1])
        print(f"test_acc={m:.4f} ci95={c:.4f} steps={cfg.eval_steps}")
        results["test"] = {"accuracy_by_step": [data.mean_ci(r) for r in curve], "accuracy": m, "ci95": c}
    data.write_results(cfg.out, results)
    if cfg.plot and cfg.dataset == "sinusoid":
        plot_sinusoid("maml_sinusoid.png" if cfg.plot == "auto" else cfg.plot, cfg, problem, params,
                      pretrained, table[5].get("pretrained_lr"))
    elif cfg.plot:
        data.plot_curves("maml_curve.png" if cfg.plot == "auto" else cfg.plot, [("", range(len(curve)), results["test"]["accuracy_by_step"])],
                         f"{cfg.dataset} {cfg.ways}-way {cfg.shots}-shot, {'FO' if cfg.first_order else ''}MAML")
    return results


if __name__ == "__main__":
    data.run(main)
