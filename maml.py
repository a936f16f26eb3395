"""maml.py: Model-Agnostic Meta-Learning, second-order and first-order.

Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
ICML 2017. This file implements Algorithm 2 (MAML for few-shot supervised learning):

    Alg. 2 line 3     sample a batch of tasks T_i ~ p(T)          train(): problem.sample("train", ...)
    Alg. 2 lines 5-7  θ'_i = θ − α ∇θ L_Ti(f_θ) on K examples      adapt()
    Alg. 2 line 8     sample D'_i, the query set of each task       the same call (x_query, y_query)
    Alg. 2 line 10    θ ← θ − β ∇θ Σ_i L_Ti(f_θ'_i) (Adam)          meta_step()
    §5.2              first-order MAML drops the second derivatives: adapt(first_order=True)
    Alg. 3 (§3.2)     meta-RL: adapt_policy() is adapt() on the REINFORCE loss; rl.py samples
                      trajectories and takes the TRPO meta-step (python maml.py --env ...)

Symbols, named the same in every script of this project:
    θ   params           meta-parameters, a dict of tensors
    θ'  fast             adapted parameters, one copy per task (leading dimension T)
    α   inner_lr         inner-loop step size
    β   outer_lr         step size of the meta-update (Adam)
    N   ways             classes per task
    K   shots            support examples per class (regression: points per task)
    Q   query            query examples per class for the meta-update (D'_i)
    T   meta_batch_size  tasks per meta-update

Run:    python maml.py            (sinusoid regression, CPU, about 3.5 minutes)
        python maml.py --env navigation2d   (meta-RL, Alg. 3; see rl.py)
        python maml.py --help     (every flag with its paper symbol and value)
"""

import argparse
import ctypes
import glob
import importlib.util
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import data


# ---------------------------------------------------------------------------------------------
# The paper's settings (§5.1, Appendix A.1)
# ---------------------------------------------------------------------------------------------
# The loss is averaged over the support set. cbfinn/maml sums the cross-entropy over the N·K
# support examples and divides by K (N times our mean), so its α is N·α here; we keep the paper's α
# as printed (README: the α convention).
PAPER_SETTINGS = {
    # §5.1: 1 step, α = 0.01, K = 10, Adam; the reference code: meta-batch 25, β = 1e-3, 70k iterations
    "sinusoid": dict(shots=10, query=10, inner_lr=0.01, inner_steps=1, eval_steps=10,
                     meta_batch_size=25, outer_lr=1e-3, iterations=70000),
    # A.1: 5-way: 1 step, α = 0.4, meta-batch 32, evaluated with 3 steps; 60k iterations.
    # The reference code uses K query examples per class (D'_i as large as D_i).
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


def paper_settings(dataset, ways, shots):
    """The settings above for a dataset, with the batching of CHUNKS (speed only, below)."""
    if dataset == "omniglot":
        key = "omniglot-20way" if ways >= 20 else "omniglot-5way"
    else:
        key = dataset if dataset == "sinusoid" else "miniimagenet"   # also the default for an image folder
    s = {**PAPER_SETTINGS[key], **CHUNKS[key]}
    if dataset == "omniglot":
        s["query"] = shots
    elif dataset != "sinusoid":
        s["meta_batch_size"] = 4 if shots == 1 else 2
    return s


# ---------------------------------------------------------------------------------------------
# The functional models. Every forward takes params with a leading task dimension T, so a whole
# meta-batch runs as one batched computation: x is (T, B, ...) and the output (T, B, outputs).
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
    """BatchNorm with the statistics of the batch at hand, at training and at test time, as the
    reference code does (transductive); no running statistics. h: (B, T*C, H, W), so each task's
    channels are separate channels here and get their own statistics."""
    return F.batch_norm(h, None, None, weight, bias, training=True, eps=eps)


def conv_body(params, x, max_pool, activations=None):
    """The four conv blocks: x (T, B, C, H, W) -> features (T, B, D). The T tasks sit side by
    side as channel groups of one grouped convolution. When a list is given as `activations`,
    each block's output (T, B, C, H, W) is appended to it (anil.py's CCA/CKA).

    Omniglot (max_pool=False): 64 filters, stride-2 convs, then the global average -> 64-d.
    MiniImageNet (max_pool=True): 32 filters, stride 1 and 2x2 max-pool, flattened -> 800-d."""
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


def meta_loss(params, problem, batch, cfg, adapt=adapt):
    """Σ_i L_Ti(f_θ'_i) on the query sets D'_i (Alg. 2 line 10), averaged over the T tasks as
    the reference code does. Returns the loss and the per-task query metric. anil.py passes
    its own inner loop as `adapt`; everything else is shared."""
    x_s, y_s, x_q, y_q = batch
    fast = adapt(per_task(params, x_s.shape[0]), problem.forward, problem.loss, x_s, y_s,
                 cfg.inner_steps, cfg.inner_lr, cfg.first_order)
    out = problem.forward(fast, x_q)
    return problem.loss(out, y_q).mean(), problem.metric(out.detach(), y_q)


def meta_step(params, optimizer, problem, batch, cfg, adapt=adapt):
    """Alg. 2 line 10: θ ← θ − β ∇θ Σ_i L_Ti(f_θ'_i), with Adam. The meta-batch is processed
    `task_chunk` tasks at a time, each chunk's graph freed by its own backward pass; the
    accumulated gradient is the same for any chunk size. A non-finite loss is refused before
    it can touch θ."""
    tasks = batch[0].shape[0]
    chunk = cfg.task_chunk or tasks
    optimizer.zero_grad(set_to_none=True)
    total, metrics = 0.0, []
    for start in range(0, tasks, chunk):
        part = tuple(b[start:start + chunk] for b in batch)
        loss, metric = meta_loss(params, problem, part, cfg, adapt)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"the meta-loss is {loss.item()}")
        weight = part[0].shape[0] / tasks           # chunk means -> the mean over the meta-batch
        (loss * weight).backward()
        total += loss.item() * weight
        metrics.append(metric)
    if getattr(cfg, "clip_grad", None):         # the reference code's MiniImageNet setting
        for p in params.values():
            p.grad.clamp_(-cfg.clip_grad, cfg.clip_grad)
    optimizer.step()
    return total, torch.cat(metrics).mean().item()


# ---------------------------------------------------------------------------------------------
# Evaluation: the adaptation curve on unseen tasks (Fig. 3), mean ± 95% CI; §5.1's baseline
# ---------------------------------------------------------------------------------------------

def adaptation_curve(params, problem, batches, inner_lr, eval_steps, bn_mode="transductive", adapt=adapt):
    """Per-task metric after 0, 1, ..., eval_steps inner steps: a (steps+1, tasks) array."""
    rows = [[] for _ in range(eval_steps + 1)]
    for x_s, y_s, x_q, y_q in batches:
        fast = {k: v.detach().requires_grad_() for k, v in per_task(params, x_s.shape[0]).items()}
        for step in range(eval_steps + 1):
            if step > 0:
                fast = adapt(fast, problem.forward, problem.loss, x_s, y_s, 1, inner_lr, first_order=True)
            with torch.no_grad():
                rows[step].append(problem.metric(predict(fast, problem.forward, x_s, x_q, bn_mode), y_q).cpu())
    return torch.stack([torch.cat(r) for r in rows]).numpy()


def evaluate(params, problem, split, tasks, seed, cfg, adapt=adapt):
    """The adaptation curve on a fixed, seeded set of tasks of `split` (seed + 1 val, seed + 2 test)."""
    batches = task_batches(problem, split, tasks, cfg.eval_chunk, seed)
    return adaptation_curve(params, problem, batches, cfg.inner_lr, cfg.eval_steps, cfg.bn_mode, adapt)


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
    import rl
    return adapt(params, rl.policy_forward, rl.reinforce_loss, rl.flat_obs(episodes), episodes,
                 1, inner_lr, first_order)


def task_batches(problem, split, tasks, batch_size, seed, **kw):
    """A fixed, seeded set of `tasks` tasks in batches of `batch_size`. Tasks are drawn one at a
    time, so the set is the same for every model and every batch size."""
    g = torch.Generator().manual_seed(seed)
    done = 0
    while done < tasks:
        n = min(batch_size, tasks - done)
        drawn = [problem.sample(split, 1, g, **kw) for _ in range(n)]
        yield tuple(torch.cat(parts) for parts in zip(*drawn))
        done += n


def mean_ci(values):
    """Mean and 95% confidence half-width 1.96·σ/√n over tasks."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), 0.0
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(len(values)))


def pretrain_step(params, optimizer, problem, batch):
    """Plain regression onto random sinusoids: no inner loop, so the network learns the mean
    output over tasks (App. C.1)."""
    x_s, y_s, x_q, y_q = batch
    x, y = torch.cat([x_s, x_q], 1), torch.cat([y_s, y_q], 1)
    loss = problem.loss(problem.forward(per_task(params, x.shape[0]), x), y).mean()
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"the pretraining loss is {loss.item()}")
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
            return task_batches(problem, split, n, cfg.eval_chunk, seed, shots=K, query=SINUSOID_EVAL_POINTS)
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
# one batched computation. Batching many small tasks pays on the CPU; for 84x84 images one task
# at a time is faster (tests/benchmark.py), and non-transductive evaluation of 75 queries needs
# 75 BatchNorm groups per task.
CHUNKS = {"sinusoid": dict(task_chunk=25, eval_chunk=100), "omniglot-5way": dict(task_chunk=32, eval_chunk=50),
          "omniglot-20way": dict(task_chunk=4, eval_chunk=10), "miniimagenet": dict(task_chunk=1, eval_chunk=1)}
# `python maml.py` with no arguments takes about 3.5 minutes on one CPU thread (README); --full
# gives the paper's 70k iterations.
QUICK_SINUSOID_ITERATIONS = 30000


class NonFiniteLoss(RuntimeError):
    """A NaN or inf loss: training stops before it touches θ, and the last checkpoint is kept."""


def conv_feature_dim(image_size, hidden, max_pool):
    size = image_size
    for _ in range(4):
        size = size // 2 if max_pool else (size + 1) // 2
    return hidden * size * size if max_pool else hidden


class HelpFormatter(argparse.HelpFormatter):
    """Shows a flag's default only when it has one; unset flags take the paper's value."""
    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "%(default)" in action.help:                  # `is`: a default of 0 is shown
            return action.help
        return action.help + " (default: %(default)s)"


def build_parser():
    p = argparse.ArgumentParser(
        description="MAML and first-order MAML (Finn et al. 2017). Flags left unset take the "
                    "paper's value for the chosen dataset (Appendix A.1, §5.1).",
        allow_abbrev=False, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--dataset", choices=["sinusoid", "omniglot", "miniimagenet", "folder"], default="sinusoid",
      help="task distribution: sinusoid (§5.1), omniglot / miniimagenet (§5.2), or an image folder")
    a("--data-dir", default=None, help="dataset folder (omniglot default: ./data/omniglot, downloaded "
      "if empty; miniimagenet default: ./data/miniimagenet; folder: required)")
    a("--test-dir", default=None, help="meta-test on every class of this image folder instead of the test split")
    a("--predict", nargs="+", default=None, metavar="IMAGE_OR_DIR", help="few-shot prediction on your own "
      "images: adapt the --load model to --support as at test time, then classify these images (or folders)")
    a("--support", default=None, help="with --predict: DIR/<class>/<images>, any number of images per class")
    a("--ways", type=int, default=5, help="N, classes per task (paper: 5 or 20)")
    a("--shots", type=int, default=None, help="K, support examples per class (paper: 1 or 5; sinusoid: 10 points)")
    a("--query", type=int, default=None, help="Q, query examples per class for the meta-update "
      "(paper: K on Omniglot, 15 on MiniImageNet, 10 sinusoid points)")
    a("--inner-lr", type=float, default=None, help="α, inner step size (paper: 0.01 sinusoid, 0.4 Omniglot 5-way, "
      "0.1 20-way, 0.01 MiniImageNet), for a loss averaged over the support set")
    a("--inner-steps", type=int, default=None, help="inner gradient steps in training (paper: 1, 5 for 20-way and MiniImageNet)")
    a("--eval-steps", type=int, default=None, help="inner steps at test time (paper: 10 sinusoid, 3 / 5 Omniglot, 10 MiniImageNet)")
    a("--outer-lr", type=float, default=None, help="β, Adam step size of the meta-update (paper code: 1e-3)")
    a("--meta-batch-size", type=int, default=None, help="T, tasks per meta-update (paper: 25 sinusoid, 32 / 16 Omniglot, 4 / 2 MiniImageNet)")
    a("--clip-grad", type=float, default=None, help="clip each meta-gradient entry to ±this before Adam "
      "(cbfinn/maml: 10 on MiniImageNet, none on Omniglot and the sinusoid; the paper does not say)")
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
    a("--rotate-eval", action="store_true", help="Omniglot: rotated copies of val/test characters are classes too")
    a("--rotate-tasks", action="store_true", help="Omniglot as cbfinn/maml: no rotated classes; each class of "
      "every task, in training and test, is turned by its own random multiple of 90°")
    a("--split-seed", type=int, default=0, help="seed of the train/val/test class split")
    a("--image-size", type=int, default=84, help="folder datasets: images are resized to this")
    a("--channels", type=int, choices=[1, 3], default=3, help="folder datasets: 1 (grayscale) or 3 (RGB)")
    a("--seed", type=int, default=0, help="seeds the initialization and the task stream")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    a("--out", default=None, help="write the config and final metrics to this JSON file")
    a("--save", default=None, help="checkpoint path, written atomically at each validation and at the end")
    a("--resume", default=None, help="continue training from this checkpoint, exactly as if never stopped; "
      "only --iterations, --inner-lr, --outer-lr and the evaluation flags may differ from it")
    a("--load", default=None, help="checkpoint to evaluate (with --eval-only)")
    a("--eval-only", action="store_true", help="only meta-test the --load checkpoint")
    a("--plot", nargs="?", const="auto", default=None, help="save a figure (maml.py: the sinusoid "
      "of Fig. 2 or the adaptation curve; anil.py: the --similarity bars); needs matplotlib")
    a("--env", default=None, help="meta-RL instead (Alg. 3, §5.3): navigation2d, halfcheetah-dir, halfcheetah-vel, "
      "ant-dir or ant-vel; `--env NAME --help` lists the meta-RL flags")
    return p


def finalize_config(cfg):
    """Fill unset flags with the paper's settings and reject impossible combinations."""
    check_session_flags(cfg)
    if cfg.dataset == "folder" and not cfg.data_dir and not cfg.eval_only:
        raise SystemExit("error: --dataset folder needs --data-dir DIR (DIR/<class>/<images>)")
    if cfg.shots is None:
        cfg.shots = 10 if cfg.dataset == "sinusoid" else 1
    if cfg.dataset == "sinusoid" and cfg.iterations is None and not cfg.full:
        cfg.iterations = QUICK_SINUSOID_ITERATIONS      # an explicit --iterations always wins
    for k, v in paper_settings(cfg.dataset, cfg.ways, cfg.shots).items():
        if getattr(cfg, k, None) is None:
            setattr(cfg, k, v)
    if cfg.val_every is None:
        cfg.val_every = max(1, cfg.iterations // 10)
    for name in ("ways", "shots", "query", "inner_steps", "meta_batch_size", "iterations",
                 "val_tasks", "test_tasks", "eval_chunk", "val_every", "task_chunk"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1")
    if cfg.eval_steps < 0:
        raise SystemExit("error: --eval-steps must be at least 0")
    return cfg


def check_session_flags(cfg):
    """The checks every entry point shares (maml.py, anil.py, nil.py, reptile.py, rl.py), before any
    data is loaded: flags that go together, matplotlib for --plot, the device, then the numbers, the
    dataset's own flags and the output paths below."""
    if getattr(cfg, "predict", None) or getattr(cfg, "support", None):
        if not (cfg.predict and cfg.support and cfg.load):
            raise SystemExit("error: --predict IMAGES needs --support DIR and --load CHECKPOINT")
        if cfg.dataset == "sinusoid":
            raise SystemExit(f"error: --predict classifies images; {cfg.load} is a sinusoid regressor")
        cfg.eval_only = True
    if cfg.eval_only and not cfg.load:
        raise SystemExit("error: --eval-only needs --load CHECKPOINT")
    if cfg.load and not cfg.eval_only:
        raise SystemExit("error: --load is for --eval-only; use --resume CHECKPOINT to continue training")
    if cfg.load and cfg.resume:
        raise SystemExit("error: give either --resume (continue training) or --load (with --eval-only)")
    if cfg.plot and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("error: --plot needs matplotlib, which is optional: pip install matplotlib")
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device {cfg.device}: this code runs on cpu or cuda (cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for, but torch sees no CUDA device")
    check_numbers(cfg)
    refuse_unused(cfg)
    check_output_paths(cfg)


# flag: (its default, the datasets where it means something); given elsewhere, it is refused, not ignored
DATASET_FLAGS = {"sinusoid_variant": ("maml", {"sinusoid"}), "no_baseline": (False, {"sinusoid"}),
                 "full": (False, {"sinusoid"}), "rotate_eval": (False, {"omniglot"}),
                 "rotate_tasks": (False, {"omniglot"}), "image_size": (84, {"folder"}), "channels": (3, {"folder"}),
                 "data_dir": (None, {"omniglot", "miniimagenet", "folder"}),
                 "test_dir": (None, {"omniglot", "miniimagenet", "folder"})}


def refuse_unused(cfg):
    for k, (default, datasets) in DATASET_FLAGS.items():
        if hasattr(cfg, "dataset") and getattr(cfg, k, default) != default and cfg.dataset not in datasets:
            raise SystemExit(f"error: --{k.replace('_', '-')} is for --dataset {' or '.join(sorted(datasets))}, "
                             f"not {cfg.dataset}")


STEP_SIZES = ("inner_lr", "outer_lr", "meta_step_size", "max_kl", "clip_grad")


def check_numbers(cfg):
    """Numbers that argparse accepts but no run can use: NaN or inf anywhere, a step size that is not
    positive, a seed outside numpy's range, an image too small for four 2×2 max-pools."""
    for k, v in vars(cfg).items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, float) and not math.isfinite(v):
            raise SystemExit(f"error: {flag} {v}: not a finite number")
        if k in STEP_SIZES and v is not None and v <= 0:
            raise SystemExit(f"error: {flag} {v}: a step size must be positive")
        if k in ("seed", "split_seed") and not 0 <= v < 2 ** 32:
            raise SystemExit(f"error: {flag} {v}: seeds lie in [0, 2^32)")
    if getattr(cfg, "image_size", 16) < 16:
        raise SystemExit(f"error: --image-size {cfg.image_size}: the network's four 2×2 max-pools need at least 16")


def check_output_paths(cfg):
    """--out, --save and --plot are checked before any data is loaded or any step is trained, so that
    a typo in a folder name cannot cost a finished run. A missing folder is created, as for --save."""
    plot = None if cfg.plot == "auto" else cfg.plot
    for flag, path in (("--out", cfg.out), ("--save", cfg.save), ("--plot", plot)):
        if not path:
            continue
        if os.path.isdir(path):
            raise SystemExit(f"error: {flag} {path} is a folder; give a file name")
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            blocker = next((p for p in [folder, *Path(folder).parents] if os.path.isfile(p)), None)
            why = f"{blocker} is a file" if blocker else e.strerror
            raise SystemExit(f"error: {flag} {path}: cannot create the folder {folder} ({why})") from None
        if not os.access(folder, os.W_OK):
            raise SystemExit(f"error: {flag} {path}: the folder {folder} is not writable")
    for orphan in glob.glob(glob.escape(os.path.abspath(cfg.save)) + ".*.tmp") if cfg.save else []:
        os.remove(orphan)       # a save that a kill -9 interrupted (save_checkpoint names them so)


def write_results(path, results):
    """The --out JSON, written before any figure. If it still cannot be written (disk full, folder
    removed), the results go to a file in the temporary folder and the run exits non-zero, saying where."""
    if path:
        try:
            with open(path, "w") as f:
                json.dump(results, f, indent=1, default=str)
        except OSError as e:
            fd, spare = tempfile.mkstemp(prefix="results-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(results, f, indent=1, default=str)
            raise SystemExit(f"error: could not write --out {path} ({e.strerror}); "
                             f"the results are in {spare}") from None
        print(f"wrote {path}")
    if not all_finite(results.get("test")):
        raise SystemExit("error: the test result is not finite (NaN or inf): the model diverged"
                         + (f"; the numbers are in {path}" if path else ""))
    return results


def all_finite(x):
    if isinstance(x, dict):
        return all(all_finite(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(all_finite(v) for v in x)
    return not isinstance(x, float) or math.isfinite(x)


@dataclass
class Problem:
    """What the algorithm needs to know about a task distribution."""
    params: dict                     # θ at initialization
    forward: Callable                # forward(params with leading T, x (T, B, ...)) -> (T, B, outputs)
    loss: Callable                   # loss(out, y) -> (T,)
    metric: Callable                 # what evaluation reports per task: accuracy or MSE
    metric_name: str
    sample: Callable                 # sample(split, tasks, generator) -> x_s, y_s, x_q, y_q
    has_val: bool = True             # False when the val split has fewer classes than ways


def make_problem(cfg, device, splits=None):
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.dataset == "sinusoid":
        def sample(split, tasks, generator, shots=None, query=None):
            b = data.sinusoid_tasks(tasks, shots or cfg.shots, query or cfg.query, generator,
                                    cfg.sinusoid_variant, device)
            return b["x_support"], b["y_support"], b["x_query"], b["y_query"]
        return Problem(init_mlp([1, 40, 40, 1], g), mlp_forward, mse_per_task, mse_per_task, "mse", sample)

    samplers = {}
    for name, split in splits.items():
        if name == "val" and split.num_classes < cfg.ways:
            print(f"note: the val split has {split.num_classes} classes, fewer than ways={cfg.ways}; "
                  f"validation is skipped" + (" (--rotate-eval adds rotated val/test classes)"
                                              if cfg.dataset == "omniglot" else ""))
            continue
        samplers[name] = data.EpisodeSampler(split, cfg.ways, cfg.shots, cfg.query, device, name,
                                             cfg.rotate_tasks)
    size, channels, _ = image_format(cfg)
    max_pool = cfg.dataset != "omniglot"
    hidden = 64 if cfg.dataset == "omniglot" else 32
    params = init_convnet(channels, hidden, cfg.ways, conv_feature_dim(size, hidden, max_pool), g)

    def forward(p, x):
        return conv_forward(p, x, max_pool)

    def sample(split, tasks, generator):
        return samplers[split].sample(tasks, generator)
    return Problem(params, forward, cross_entropy_per_task, accuracy_per_task, "acc", sample,
                   has_val="val" in samplers)


def classify(params, problem, cfg, x_s, y_s, x_q, adapt=adapt):
    """--predict: class probabilities (T, M, N) of the queries after the test-time inner loop on the
    support set (eval_steps steps of α, first order as at test), with --bn-mode's BatchNorm batches."""
    fast = {k: v.detach().requires_grad_() for k, v in per_task(params, x_s.shape[0]).items()}
    fast = adapt(fast, problem.forward, problem.loss, x_s, y_s, cfg.eval_steps, cfg.inner_lr, first_order=True)
    with torch.no_grad():
        return predict(fast, problem.forward, x_s, x_q, cfg.bn_mode).softmax(-1)


def run_predict(cfg, classify, any_ways=False):
    """Few-shot prediction on a user's images: read --support and --predict (data.py), classify, print
    one line per image (path, class, probability) and, where the folders name the classes, the accuracy.
    any_ways: NIL, which has no head, takes any number of support classes."""
    try:
        sets = data.load_prediction_sets(cfg.support, cfg.predict, *image_format(cfg))
    except data.DataError as e:
        raise SystemExit(f"error: {e}") from None
    if not any_ways and len(sets.classes) != cfg.ways:
        raise SystemExit(f"error: --support {cfg.support} has {len(sets.classes)} classes, but the model's head "
                         f"has {cfg.ways} (its --ways): give {cfg.ways} class folders")
    device = torch.device(cfg.device)
    x_s, x_q = (x[None].float().div_(255.0).to(device) for x in (sets.x_support, sets.x_query))
    probs = classify(x_s, sets.y_support[None].to(device), x_q)[0].cpu()       # (M, N)
    confidence, label = probs.max(-1)
    rows = [{"image": p, "class": sets.classes[c], "probability": round(float(q), 4)}
            for p, c, q in zip(sets.query_paths, label.tolist(), confidence.tolist())]
    print(f"{len(sets.y_support)} support images of {len(sets.classes)} classes; image, class, probability:")
    for r in rows:
        print(f"{r['image']}\t{r['class']}\t{r['probability']:.4f}")
    results = {"config": vars(cfg), "classes": sets.classes, "predictions": rows}
    if sets.y_query is not None:
        results["accuracy"] = float((label == sets.y_query).float().mean())
        print(f"accuracy on the {len(rows)} images, whose folders name their class: {results['accuracy']:.4f}")
    if cfg.out and cfg.out.endswith(".csv"):
        data.write_predictions_csv(cfg.out, rows)
        print(f"wrote {cfg.out}")
        return results
    return write_results(cfg.out, results)


def image_format(cfg):
    """(size, channels, invert) of the network's input, from the config alone: Omniglot is 28x28 grey
    with ink = 1, MiniImageNet 84x84 RGB, a folder as --image-size and --channels say."""
    if cfg.dataset == "omniglot":
        return 28, 1, True
    if cfg.dataset == "miniimagenet":
        return 84, 3, False
    return cfg.image_size, cfg.channels, False


def load_splits(cfg):
    if cfg.dataset == "sinusoid" or cfg.predict:
        return {}
    if cfg.test_dir and cfg.eval_only:         # the checkpoint fixes the format: no training data needed
        splits = {"test": data.load_image_folder_classes(cfg.test_dir, *image_format(cfg))}
    elif cfg.dataset == "omniglot":
        splits = data.load_omniglot(cfg.data_dir, cfg.split_seed, cfg.rotate_eval,
                                    rotated_classes=not cfg.rotate_tasks)
    elif cfg.dataset == "miniimagenet":
        splits = data.load_miniimagenet(cfg.data_dir)
    else:
        splits = data.load_image_folder(cfg.data_dir, cfg.split_seed, cfg.image_size, cfg.channels)
    if cfg.test_dir and not cfg.eval_only:
        splits["test"] = data.load_image_folder_classes(cfg.test_dir, *image_format(cfg))
    if cfg.test_dir and splits["test"].num_classes < 2 * cfg.ways:
        print(f"note: --test-dir has {splits['test'].num_classes} classes, fewer than 2 × ways = {2 * cfg.ways}: "
              f"its {cfg.test_tasks} tasks redraw the same classes, so they are not independent and the "
              f"± understates the uncertainty")
    return splits


def save_checkpoint(path, state):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # named after the checkpoint, so that the next start can remove one that a kill -9 left behind
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)   # atomic: a crash leaves the previous checkpoint intact
    except OSError as e:        # a full disk: the previous checkpoint is still there
        os.unlink(tmp)
        raise SystemExit(f"error: could not write the checkpoint {path} ({e.strerror}); "
                         f"the previous one, if any, is intact") from None
    except BaseException:
        os.unlink(tmp)
        raise


def load_checkpoint(path):
    if not os.path.exists(path):
        raise SystemExit(f"error: checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torch's own message advises weights_only=False, which runs arbitrary code
        raise SystemExit(f"error: checkpoint {path} is corrupt or not a torch file ({type(e).__name__})") from None
    if not isinstance(state, dict) or not {"params", "config", "iteration"} <= set(state):
        raise SystemExit(f"error: {path} is not a checkpoint of this project "
                         f"(expected a dict with params, config, iteration)")
    if state.get("format", 1) > CHECKPOINT_FORMAT:
        raise SystemExit(f"error: {path} was written by a newer version of this code (format {state['format']})")
    return state


CHECKPOINT_FORMAT = 1   # every checkpoint records it, and the script that wrote it ("algorithm")


def checkpoint_algorithm(saved):
    """The script that wrote a checkpoint. Older Reptile checkpoints lack the entry but carry an inner_state."""
    return saved.get("algorithm") or ("reptile" if "inner_state" in saved else "maml")


def refuse_foreign(saved, source, accepted):
    """Refuse, before anything is trained or written, a checkpoint that another script wrote."""
    kind = checkpoint_algorithm(saved)
    if kind not in accepted:
        raise SystemExit(f"error: {source} was written by {kind}.py; this takes "
                         f"{' or '.join(f'{a}.py' for a in sorted(accepted))} checkpoints (use {kind}.py with it)")


# Flags about this invocation, always taken from the command line.
SESSION_FLAGS = {"device", "out", "save", "resume", "load", "eval_only", "plot", "predict", "support"}
# Flags that may differ from the checkpoint's when given again: the evaluation, the length, and the
# step sizes, so that a run that diverged can resume from its last good checkpoint with smaller ones.
OVERRIDABLE_FLAGS = {"iterations", "full", "test_tasks", "eval_chunk", "bn_mode", "test_dir", "data_dir",
                     "eval_steps", "val_tasks", "inner_lr", "outer_lr"}


def merge_checkpoint_config(cfg, saved, given, session_flags=SESSION_FLAGS, overridable=OVERRIDABLE_FLAGS):
    """The checkpoint's config, with this invocation's flags. A training flag given on the command
    line that contradicts the checkpoint is an error, not silently ignored."""
    merged = argparse.Namespace(**saved)
    for k, v in vars(cfg).items():
        if k in session_flags or (k in overridable and k in given) or k not in saved:
            setattr(merged, k, v)
        elif k in given and saved[k] != v:
            raise SystemExit(f"error: --{k.replace('_', '-')} {v} contradicts the checkpoint's {saved[k]}")
    return merged


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def keep_freed_memory():
    """Speed only: glibc otherwise unmaps large freed tensors at once, and every iteration
    page-faults them back in. Returns whether the setting took (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3                  # from glibc's <malloc.h>
    return mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1


class StopRequest:
    """Ctrl-C or SIGTERM during training: the current iteration ends, a checkpoint is saved (with
    --save) and the run stops with one line. A second Ctrl-C stops at once. Used as `with`."""

    def __enter__(self):
        self.asked, self.previous = False, {}
        try:
            self.previous = {s: signal.signal(s, self.ask) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:      # not the main thread: signals stay as they are
            pass
        return self

    def ask(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def check(self, done, save, bar, checkpoint):
        """At the end of an iteration."""
        if not self.asked:
            return
        bar.close()
        state = checkpoint(done) if save else None
        if state and all(torch.isfinite(v).all() for v in state["params"].values()):
            save_checkpoint(save, state)
            raise SystemExit(f"stopped at iteration {done}: the checkpoint is {save} (go on with --resume {save})")
        raise SystemExit(f"stopped at iteration {done}: nothing saved" + (" (no --save)" if not save else ""))


class NoStop:
    def check(self, *args):
        pass


def train(cfg, problem, state, adapt=adapt, algorithm="maml", stop=NoStop()):
    """Alg. 2: meta-train θ (and, for the sinusoid, the pretrained baseline beside it). anil.py
    and nil.py train with this loop and ANIL's inner loop as `adapt`."""
    device = torch.device(cfg.device)
    params = {k: v.detach().clone().to(device).requires_grad_() for k, v in state["params"].items()}
    optimizer = torch.optim.Adam(params.values(), lr=cfg.outer_lr)
    task_gen = torch.Generator()
    task_gen.manual_seed(cfg.seed)
    baseline = None
    if "baseline_params" in state:
        b_params = {k: v.detach().clone().to(device).requires_grad_() for k, v in state["baseline_params"].items()}
        b_optimizer = torch.optim.Adam(b_params.values(), lr=cfg.outer_lr)
        b_gen = torch.Generator()
        b_gen.manual_seed(cfg.seed + 100)
        baseline = (b_params, b_optimizer, b_gen)
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

    def checkpoint(iteration):
        out = {"algorithm": algorithm, "format": CHECKPOINT_FORMAT,
               "params": {k: v.detach().cpu() for k, v in params.items()}, "optimizer": optimizer.state_dict(),
               "config": vars(cfg), "iteration": iteration,
               "rng": {"tasks": task_gen.get_state()}, "history": history, "running": running}
        if baseline:
            out["baseline_params"] = {k: v.detach().cpu() for k, v in b_params.items()}
            out["baseline_optimizer"] = b_optimizer.state_dict()
            out["rng"]["baseline_tasks"] = b_gen.get_state()
        return out

    from tqdm import tqdm
    start = state["iteration"]
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc=f"{algorithm} meta-train",
               dynamic_ncols=True, mininterval=0.5)
    started = time.time()
    for it in bar:
        # Alg. 2 line 3 and line 8: a batch of tasks, each with its support and query sets
        batch = problem.sample("train", cfg.meta_batch_size, task_gen)
        try:
            loss, metric = meta_step(params, optimizer, problem, batch, cfg, adapt)
            if baseline:
                pretrain_step(b_params, b_optimizer, problem, problem.sample("train", cfg.meta_batch_size, b_gen))
        except NonFiniteLoss as e:
            bar.close()
            kept = f"; the last good checkpoint is {cfg.save}" if cfg.save and os.path.exists(cfg.save) else ""
            raise SystemExit(f"error: {e} at iteration {it + 1}: training stopped (try a smaller "
                             f"--inner-lr or --outer-lr){kept}") from None
        running = (loss, metric) if running is None else (0.98 * running[0] + 0.02 * loss,
                                                          0.98 * running[1] + 0.02 * metric)
        bar.set_postfix({"loss": f"{running[0]:.4f}", problem.metric_name: f"{running[1]:.4f}"}, refresh=False)
        done = it + 1
        if done % cfg.val_every == 0 or done == cfg.iterations:
            curve = evaluate(params, problem, "val", cfg.val_tasks, cfg.seed + 1, cfg, adapt) if problem.has_val else None
            line = {"iteration": done, "train_loss": round(running[0], 5),
                    f"train_{problem.metric_name}": round(running[1], 5)}
            if curve is not None:
                line[f"val_{problem.metric_name}"] = round(float(curve[-1].mean()), 5)
            line["elapsed_s"] = round(time.time() - started, 1)
            stop_unless_finite(params, line, cfg.save, bar)
            history.append(line)
            bar.write(" ".join(f"{k}={v}" for k, v in line.items()))
            if cfg.save:
                save_checkpoint(cfg.save, checkpoint(done))
        stop.check(done, cfg.save, bar, checkpoint)
    bar.close()
    return checkpoint(cfg.iterations)


def stop_unless_finite(params, line, save, bar):
    """A checkpoint is written only when θ and the validation numbers are finite; otherwise training
    stops here and the file on disk stays the last good one."""
    if all(torch.isfinite(v).all() for v in params.values()) and \
            all(math.isfinite(v) for v in line.values() if isinstance(v, float)):
        return
    bar.close()
    kept = f"; the last good checkpoint is {save}" if save and os.path.exists(save) else ""
    raise SystemExit(f"error: non-finite parameters or validation at iteration {line['iteration']}: training "
                     f"stopped (resume with a smaller step size){kept}")


def format_curve(curve):
    return "  ".join(f"{s}:{m:.4f}±{c:.4f}" for s, (m, c) in enumerate(mean_ci(r) for r in curve))


def print_sinusoid_table(results, eval_steps):
    steps = [s for s in (0, 1, 5, 10) if s <= eval_steps]
    paper = {("maml", 5): "0.67 / 0.38 / 0.35", ("pretrained", 5): "2.41 / 2.23 / 2.19"}
    print("\nSinusoid regression, MSE ± 95% CI after k fine-tuning steps (MAML Table 2 / Fig. 6)")
    print(f"{'K':>3} {'model':<11} " + " ".join(f"{'k=' + str(s):>15}" for s in steps) + "   paper k=1/5/10")
    for K, entry in results.items():
        for name in ("maml", "pretrained"):
            if name in entry:
                cells = " ".join(f"{m:7.3f} ± {c:5.3f}" for m, c in (mean_ci(entry[name][s]) for s in steps))
                print(f"{K:>3} {name:<11} {cells}   {paper.get((name, K), '')}")
    if "pretrained_lr" in next(iter(results.values())):
        print("pretrained fine-tuning α (tuned on validation tasks): "
              + ", ".join(f"K={K}: {e['pretrained_lr']}" for K, e in results.items()))


def plot_sinusoid(path, cfg, problem, maml_params, pretrained_params, pretrained_lr, tasks=3):
    """MAML Fig. 2: random test sinusoids (one per row), K = 5 points, each model before
    adaptation and after 1 and 10 steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    g = torch.Generator().manual_seed(cfg.seed + 3)
    b = data.sinusoid_tasks(tasks, 5, 1, g, cfg.sinusoid_variant)
    grid = torch.linspace(-5, 5, 200).reshape(1, 200, 1).expand(tasks, 200, 1)
    truth = b["amplitude"][:, None, None] * torch.sin(grid - b["phase"][:, None, None])
    models = [("MAML", maml_params, cfg.inner_lr)]
    if pretrained_params is not None:
        models.append((f"pretrained, step size {pretrained_lr}", pretrained_params, pretrained_lr))
    fig, axes = plt.subplots(tasks, len(models), figsize=(5.5 * len(models), 3 * tasks), squeeze=False)
    for col, (name, params, lr) in enumerate(models):
        params = {k: v.detach().cpu() for k, v in params.items()}
        fast = {k: v.requires_grad_() for k, v in per_task(params, tasks).items()}
        curves = {}
        for step in range(11):
            if step in (0, 1, 10):
                with torch.no_grad():
                    curves[step] = mlp_forward(fast, grid)
            fast = adapt(fast, mlp_forward, mse_per_task, b["x_support"], b["y_support"], 1, lr, True)
        for t in range(tasks):
            ax = axes[t, col]
            ax.plot(grid[t, :, 0], truth[t, :, 0], "r", label="ground truth")
            for step, out in curves.items():
                ax.plot(grid[t, :, 0], out[t, :, 0], "--" if step == 0 else "-",
                        label="pre-update" if step == 0 else f"{step} grad step" + ("s" if step > 1 else ""))
            ax.plot(b["x_support"][t, :, 0], b["y_support"][t, :, 0], "^", color="purple", label="K = 5 points")
            if t == 0:
                ax.set_title(name)
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"saved {path}")


def plot_curve(path, curve, cfg):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    stats = [mean_ci(r) for r in curve]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(range(len(stats)), [m for m, _ in stats], yerr=[c for _, c in stats], marker="o", capsize=3)
    ax.set_xlabel("inner gradient steps at test time")
    ax.set_ylabel("query accuracy")
    ax.set_title(f"{cfg.dataset} {cfg.ways}-way {cfg.shots}-shot, {'FO' if cfg.first_order else ''}MAML")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


def main_rl(argv, adapt_policy, algorithm, prog):
    """`--env NAME`: rl.py's command line, merged with a checkpoint as the supervised one is."""
    import rl
    parser = rl.build_parser(prog, algorithm)
    args = parser.parse_args(argv)
    given = {k for k, v in vars(args).items() if v != parser.get_default(k)}
    source = args.resume or args.load
    saved = load_checkpoint(source) if source else None
    if saved:
        rl.check_checkpoint(saved, source, args.env, algorithm, args.resume)
        args = merge_checkpoint_config(args, saved["config"], given, rl.SESSION_FLAGS, rl.OVERRIDABLE_FLAGS)
    check_session_flags(args)
    cfg = rl.finalize_config(args)
    seed_everything(cfg.seed)
    with StopRequest() as stop:
        results = write_results(cfg.out, rl.run(cfg, saved, adapt_policy, algorithm, stop))
    if cfg.plot:
        rl.plot_returns(f"{algorithm}_{cfg.env}.png" if cfg.plot == "auto" else cfg.plot,
                        results["test"]["return_by_step"], cfg, algorithm)
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    keep_freed_memory()
    if any(a == "--env" or a.startswith("--env=") for a in argv):
        return main_rl(argv, adapt_policy, "maml", "maml.py")
    parser = build_parser()
    args = parser.parse_args(argv)
    # Flags whose value differs from the default count as given (for --resume / --load).
    defaults = vars(parser.parse_args([]))
    given = {k for k, v in vars(args).items() if v != defaults[k]}
    source = args.resume or args.load
    saved = load_checkpoint(source) if source else None
    if saved and saved["config"].get("env"):
        raise SystemExit(f"error: {source} is a meta-RL checkpoint: add --env {saved['config']['env']}")
    if saved:
        refuse_foreign(saved, source, {"maml"})
    cfg = merge_checkpoint_config(args, saved["config"], given) if saved else args
    cfg = finalize_config(cfg)
    print("config: " + " ".join(f"{k}={v}" for k, v in vars(cfg).items()))
    seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    try:
        splits = load_splits(cfg)
        problem = make_problem(cfg, device, splits)
    except data.DataError as e:
        raise SystemExit(f"error: {e}") from None

    if saved:
        if set(saved["params"]) != set(problem.params) or any(
                saved["params"][k].shape != problem.params[k].shape for k in problem.params):
            raise SystemExit(f"error: the parameters in {source} do not fit this model "
                             f"(dataset {cfg.dataset}, ways {cfg.ways})")
        state = saved
    else:
        state = {"params": problem.params, "iteration": 0}
        if cfg.dataset == "sinusoid" and not cfg.no_baseline:
            state["baseline_params"] = init_mlp([1, 40, 40, 1], torch.Generator().manual_seed(cfg.seed + 100))

    if cfg.predict:
        params = {k: v.to(device) for k, v in state["params"].items()}
        return run_predict(cfg, partial(classify, params, problem, cfg))
    started = time.time()
    if not cfg.eval_only:
        if state["iteration"] >= cfg.iterations:
            print(f"the checkpoint is already at iteration {state['iteration']} of {cfg.iterations}")
        else:
            with StopRequest() as stop:
                state = train(cfg, problem, state, stop=stop)
    train_seconds = time.time() - started
    params = {k: v.to(device) for k, v in state["params"].items()}
    results = {"config": vars(cfg), "train_seconds": round(train_seconds, 1),
               "iteration": state["iteration"], "history": state.get("history", [])}

    if cfg.dataset == "sinusoid":
        pretrained = state.get("baseline_params")
        pretrained = {k: v.to(device) for k, v in pretrained.items()} if pretrained else None
        table = sinusoid_table(cfg, problem, params, pretrained)
        print_sinusoid_table(table, cfg.eval_steps)
        results["test"] = {f"K={K}": {name: [mean_ci(r) for r in curve] for name, curve in entry.items()
                                      if name != "pretrained_lr"} | {"pretrained_lr": entry.get("pretrained_lr")}
                           for K, entry in table.items()}
    else:
        curve = evaluate(params, problem, "test", cfg.test_tasks, cfg.seed + 2, cfg)
        print(f"\nmeta-test: {cfg.test_tasks} tasks, {cfg.ways}-way {cfg.shots}-shot, "
              f"{cfg.bn_mode} BatchNorm, accuracy ± 95% CI after k steps (α = {cfg.inner_lr}):")
        print("  " + format_curve(curve))
        m, c = mean_ci(curve[-1])
        print(f"test_acc={m:.4f} ci95={c:.4f} steps={cfg.eval_steps}")
        results["test"] = {"accuracy_by_step": [mean_ci(r) for r in curve], "accuracy": m, "ci95": c}
    write_results(cfg.out, results)
    if cfg.plot and cfg.dataset == "sinusoid":
        plot_sinusoid("maml_sinusoid.png" if cfg.plot == "auto" else cfg.plot, cfg, problem, params,
                      pretrained, table[5].get("pretrained_lr"))
    elif cfg.plot:
        plot_curve("maml_curve.png" if cfg.plot == "auto" else cfg.plot, curve, cfg)
    return results


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:   # outside training (which saves and stops on its own): nothing to keep
        raise SystemExit("interrupted; checkpoints on disk are as they were") from None
