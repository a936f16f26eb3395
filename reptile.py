"""reptile.py: Reptile, and the first-order family it belongs to.

Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", arXiv 1803.02999, 2018.
This file implements Algorithm 1 (serial Reptile), its batched form Eq. (5), and the first-order
MAML variants that §2, §6.2 and §6.3 compare it with:

    Alg. 1 line 3   sample task τ                                    train(): sample_train()
    Alg. 1 line 4   φ̃ = U^k_τ(φ), k steps of SGD or Adam (β1 = 0)      adapt()
    Alg. 1 line 5   φ ← φ + ε (φ̃ − φ)                                 meta_step()
    Eq. (5)         φ ← φ + ε (1/n) Σ_i (φ̃_i − φ), n tasks at once     meta_step()
    App. A          ε annealed linearly to 0                          epsilon_at()
    §2, Eq. (38)    first-order MAML: the last inner gradient g_k      --algorithm fomaml
    §6.2            any combination of g_1 ... g_k, summed or averaged --combination, --combine
    §6.3            shared tail / separate tail for the last batch    --tail, minibatch_schedule()
    §6.1            50 test steps, Adam statistics restored after     evaluate(); BatchNorm modes
                    each test task; transductive or not               (maml.predict)
    §4, Fig. 1      sinusoid regression, 1→64→64→1 MLP, 32 test steps --dataset sinusoid --plot

Symbols, named the same in every script of this project:
    φ   params           the initialization being meta-learned (θ in maml.py), a dict of tensors
    φ̃   fast             adapted parameters, one copy per task (leading dimension T)
    α   inner_lr         inner step size: the SGD step, or Adam's learning rate
    ε   meta_step_size   outer step size of the plain-SGD meta-update, annealed linearly to 0
    k   inner_steps      inner mini-batch steps per task
    n   meta_batch_size  tasks per meta-update (n = 1 is Algorithm 1)
    N   ways             classes per task
    K   shots            support examples per class at test time
    g_i                  gradient of the i-th inner mini-batch, taken at φ_i (Eq. 9)

With SGD the i-th inner update is u_i = φ_{i+1} − φ_i = −α g_i, and the family's meta-update is
φ ← φ + ε mean_tasks(Σ_{i∈S} w_i u_i): Reptile takes S = {1..k} summed (so Σ u_i = φ̃ − φ), and
first-order MAML takes S = {k}. With Adam the u_i are Adam's steps (the paper's code does the same).

Run:    python reptile.py            (sinusoid regression of §4, CPU, about 2 minutes)
        python reptile.py --help     (every flag with its paper symbol and value)
"""

import argparse
import math
import re
from functools import partial
import time

import torch

import data
import maml
from data import NonFiniteLoss, Problem, load_splits, mean_ci, seed_everything, task_batches
from maml import init_mlp, mlp_forward, mse_per_task, per_task, predict


# ---------------------------------------------------------------------------------------------
# The paper's settings (Appendix A, Tables 3 and 4; §4)
# ---------------------------------------------------------------------------------------------
# Table 3 (Omniglot) and Table 4 (MiniImageNet). "Training shots" are the examples per class the
# inner loop sees in meta-training (10 or 15, whatever K is at test); inner_batch is the inner
# mini-batch size. All use Adam with β1 = 0 in the inner loop and plain SGD with ε = 1.0,
# annealed to 0, in the outer loop (§6.1, App. A).
PAPER_SETTINGS = {
    "omniglot-5way": dict(inner_optimizer="adam", inner_lr=0.001, inner_batch=10, inner_steps=5,
                          train_shots=10, meta_step_size=1.0, iterations=100000, meta_batch_size=5,
                          eval_steps=50, eval_inner_batch=5),
    "omniglot-20way": dict(inner_optimizer="adam", inner_lr=0.0005, inner_batch=20, inner_steps=10,
                           train_shots=10, meta_step_size=1.0, iterations=200000, meta_batch_size=5,
                           eval_steps=50, eval_inner_batch=10),
    "miniimagenet": dict(inner_optimizer="adam", inner_lr=0.001, inner_batch=10, inner_steps=8,
                         train_shots=15, meta_step_size=1.0, iterations=100000, meta_batch_size=5,
                         eval_steps=50, eval_inner_batch=5),   # eval inner batch 15 for 5-shot
    # §4 gives the task (10 points, 32 test steps, 1→64→64→1) but no training values; the step sizes
    # and counts are those of the authors' sinusoid demo (OpenAI, "Reptile", 2018): SGD α = 0.02, one
    # pass over 50 points in mini-batches of 10, ε = 0.1 annealed, 30k iterations. Its data and network
    # are not: the demo trains a tanh network on 50 evenly spaced points; ours is ReLU (MAML's) on 50
    # points drawn from U[−5, 5], as §4 samples them (README: differences).
    "sinusoid": dict(inner_optimizer="sgd", inner_lr=0.02, inner_batch=10, inner_steps=5,
                     train_shots=50, meta_step_size=0.1, iterations=30000, meta_batch_size=1,
                     eval_steps=32, eval_inner_batch=10, shots=10),
}
ADAM_BETA2, ADAM_EPS = 0.999, 1e-8      # Adam's defaults (Kingma & Ba), which the paper keeps
SINUSOID_SIZES = (1, 64, 64, 1)         # §4: the regressor's layers, 1 → 64 → 64 → 1


# ---------------------------------------------------------------------------------------------
# The algorithm: inner loop (Alg. 1 line 4) and meta-update (Alg. 1 line 5, Eq. 5). The model
# is maml.py's (§4's regressor is its MLP with 64 units; §6.1 uses MAML's convnet).
# ---------------------------------------------------------------------------------------------

def epsilon_at(cfg, iteration):
    """App. A: 'we linearly annealed the outer step size to 0'. iteration counts from 0."""
    return cfg.meta_step_size * (1.0 - iteration / cfg.iterations)


def minibatch_schedule(tasks, n_train, n_tail, batch, steps, tail, replacement, generator):
    """The k inner mini-batches of each task, as a list of `steps` index tensors (T, batch) into
    the task's examples [train examples | tail examples].

    Cycling (the default): shuffle the n_train examples, walk through them in batches, reshuffle
    when they run out. replacement (§6.3): every batch is a fresh random draw. tail='separate'
    (§6.3): the last batch is the n_tail held-out examples, disjoint from the earlier batches."""
    batch = min(batch, n_train)
    cycled = steps - 1 if tail == "separate" else steps
    if replacement:
        idx = [torch.rand(tasks, n_train, generator=generator).argsort(1)[:, :batch] for _ in range(cycled)]
    else:
        epochs = math.ceil(cycled * batch / n_train)
        order = torch.cat([torch.rand(tasks, n_train, generator=generator).argsort(1)
                           for _ in range(epochs)], 1)                 # (T, epochs * n_train)
        idx = list(order[:, :cycled * batch].reshape(tasks, cycled, batch).unbind(1))
    if tail == "separate":
        idx.append(n_train + torch.arange(n_tail).expand(tasks, n_tail))
    return idx


def map_state(state, fn):
    """Adam's statistics with fn applied to each tensor; None (the SGD inner loop) stays None."""
    if state is None:
        return None
    return {"t": state["t"], "m": {k: fn(v) for k, v in state["m"].items()},
            "v": {k: fn(v) for k, v in state["v"].items()}}


def state_tensors(state):
    """The tensors of Adam's statistics, in a fixed order; none for the SGD inner loop."""
    return [] if state is None else [*state["m"].values(), *state["v"].values()]


def init_inner_state(params):
    """Adam's statistics for the inner loop, shaped like φ. The paper never resets them during
    training (§6.1) and keeps the step count running."""
    return map_state({"t": 0, "m": params, "v": params}, torch.zeros_like)


def adam_update(grads, state, lr, beta1):
    """One Adam step (Kingma & Ba 2015, Alg. 1) for per-task tensors. Returns the update u and
    the new state; nothing is modified in place, so a caller's backup can never be touched."""
    t = state["t"] + 1
    m = {k: beta1 * state["m"][k] + (1 - beta1) * g for k, g in grads.items()}
    v = {k: ADAM_BETA2 * state["v"][k] + (1 - ADAM_BETA2) * g * g for k, g in grads.items()}
    c1, c2 = 1 - beta1 ** t, 1 - ADAM_BETA2 ** t
    update = {k: -lr * (m[k] / c1) / ((v[k] / c2).sqrt() + ADAM_EPS) for k in grads}
    return update, {"t": t, "m": m, "v": v}


def adapt(fast, problem, x, y, schedule, inner_lr, optimizer, state=None, beta1=0.0):
    """Alg. 1 line 4: φ̃ = U^k_τ(φ), for T tasks at once. It differs from maml.adapt where the
    algorithm does: k mini-batches (the schedule) instead of k steps on the whole support set, an
    inner optimizer (SGD, or Adam whose state carries over) instead of plain gradient steps, and no
    first_order flag: every gradient is taken at the current φ_i and treated as a constant
    (create_graph=False), which is what makes this family cheap (§2).
    fast: (T, ...) tensors; x, y: (T, M, ...) the tasks' examples; schedule: k index tensors (T, b);
    state: Adam's statistics, shaped like φ (every task starts from them) or per task (T, ...).
    Returns φ̃, the updates u_i = φ_{i+1} − φ_i, the new state, and the last batch's loss and metric (T,)."""
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    updates = []
    for idx in schedule:
        idx = idx.to(x.device)
        xb, yb = x[rows, idx], y[rows, idx]                           # (T, b, ...)
        fast = {k: v.detach().requires_grad_() for k, v in fast.items()}
        out = problem.forward(fast, xb)
        loss = problem.loss(out, yb)                                  # (T,)
        # Eq. (9): g_i = L'_i(φ_i). The tasks never mix, so the gradient of the summed loss with
        # respect to copy i is task i's own gradient.
        grads = torch.autograd.grad(loss.sum(), list(fast.values()), create_graph=False)
        grads = dict(zip(fast, grads))
        if optimizer == "sgd":
            # Eq. (10): φ_{i+1} = φ_i − α g_i
            u = {k: -inner_lr * g for k, g in grads.items()}
        else:
            # §6.1: Adam with β1 = 0; the same formula, elementwise rescaled
            u, state = adam_update(grads, state, inner_lr, beta1)
        with torch.no_grad():
            fast = {k: v + u[k] for k, v in fast.items()}
            metric = problem.metric(out, yb)
        updates.append(u)
    return {k: v.detach() for k, v in fast.items()}, updates, state, loss.detach(), metric


def meta_step(params, state, problem, batch, cfg, schedule, epsilon):
    """Alg. 1 lines 4-5 for n = T tasks: φ̃_i = U^k_τi(φ) for each, then Eq. (5). Returns the new φ, the
    new inner-optimizer state, and the per-task loss and metric of the last inner mini-batch (at φ_k,
    before its step). Nothing passed in is modified."""
    x, y = task_examples(batch, cfg)
    # Alg. 1 line 4: φ̃_i = U^k_τi(φ), the n tasks side by side from the same φ
    fast, updates, new_state, loss, metric = adapt(per_task(params, x.shape[0]), problem, x, y, schedule,
                                                   cfg.inner_lr, cfg.inner_optimizer, state, cfg.adam_beta1)
    # plain Reptile moves toward φ̃_i itself; §6.2's variants toward φ plus the chosen inner updates
    target = fast if is_plain_reptile(cfg, len(updates)) else combined_target(params, updates, cfg)
    # (1/n) Σ_i φ̃_i, over every torchrun rank's tasks too (the inner optimizer's statistics alike)
    mean_target, new_state = mean_over_tasks(target, new_state, loss, x.shape[0])
    # Eq. (5): φ ← φ + ε (1/n) Σ_i (φ̃_i − φ), written as a lerp so that ε = 1 lands exactly on
    # the mean of the φ̃_i (Alg. 1 line 5 is n = 1; Eq. 47: (1 − ε) φ + ε φ̃)
    new_params = {k: torch.lerp(params[k], mean_target[k], epsilon) for k in params}
    return new_params, new_state, loss, metric


# ---------------------------------------------------------------------------------------------
# Evaluation (§6.1): 50 inner steps on each test task's support set, then classify its queries
# ---------------------------------------------------------------------------------------------

def curve_steps(eval_steps, bn_mode="transductive"):
    """Where the adaptation curve is measured. Nontransductive predictions run N·Q forward passes
    of N·K + 1 images (20-way: 420 images per task, ten times the cost of an inner step), so
    that mode is measured before and after adaptation only."""
    if bn_mode == "nontransductive":
        return sorted({0, eval_steps})
    return sorted({s for s in (0, 1, 5, 10) if s <= eval_steps} | {eval_steps})


def adaptation_curve(params, problem, batches, cfg, state, bn_modes, seed):
    """Per-task metric after each step in curve_steps(): {bn_mode: (steps, tasks) array}. Each task
    starts from φ and the training-time Adam statistics, which are functional inputs here and so are
    exactly as they were afterwards (§6.1: 'we did backup and reset the Adam statistics when
    evaluating on the test set to avoid information leakage'); no task sees another's adaptation."""
    rows = {mode: {step: [] for step in curve_steps(cfg.eval_steps, mode)} for mode in bn_modes}
    g = torch.Generator().manual_seed(seed)   # the mini-batch order: the same for every model
    for x_s, y_s, x_q, y_q in batches:
        T = x_s.shape[0]
        # drawn task by task, so that the order does not depend on --eval-chunk
        per_task_schedules = [minibatch_schedule(1, x_s.shape[1], 0, cfg.eval_inner_batch, cfg.eval_steps,
                                                 "shared", False, g) for _ in range(T)]
        schedule = [torch.cat(parts) for parts in zip(*per_task_schedules)]
        fast, task_state = per_task(params, T), state
        for step in range(cfg.eval_steps + 1):
            if step > 0:
                fast, _, task_state, _, _ = adapt(fast, problem, x_s, y_s, schedule[step - 1:step],
                                                  cfg.inner_lr, cfg.inner_optimizer, task_state, cfg.adam_beta1)
            with torch.no_grad():
                for mode, by_step in rows.items():
                    if step in by_step:
                        out = predict(fast, problem.forward, x_s, x_q, mode)
                        by_step[step].append(problem.metric(out, y_q).cpu())
    return {mode: torch.stack([torch.cat(r) for r in by_step.values()]).numpy() for mode, by_step in rows.items()}


def evaluate(params, problem, split, tasks, seed, cfg, state, bn_modes):
    batches = task_batches(problem, split, tasks, cfg.eval_chunk, seed)
    return adaptation_curve(params, problem, batches, cfg, state, bn_modes, seed + 1000)


# ---- Below: what the paper does not contain: command line, data, checkpoints, training loop, plots ----

def build_parser():
    p = argparse.ArgumentParser(
        description="Reptile and first-order MAML (Nichol et al. 2018). Flags left unset take the "
                    "paper's value for the chosen dataset (Appendix A, Tables 3-4; §4).",
        allow_abbrev=False, formatter_class=data.HelpFormatter)
    a = p.add_argument
    data.add_dataset_flags(p, "sinusoid (§4), omniglot / miniimagenet (§6.1)")
    a("--ways", type=int, default=5, help="N, classes per task (paper: 5 or 20)")
    a("--shots", type=int, default=None, help="K, support examples per class at test time "
      "(paper: 1 or 5; sinusoid: 10 points)")
    a("--query", type=int, default=1, help="test examples per class to classify after adaptation (paper §6.1: 1)")
    a("--train-shots", type=int, default=None, help="examples per class the inner loop sees in "
      "meta-training (paper: 10 Omniglot, 15 MiniImageNet; sinusoid demo: 50 points)")
    a("--tail-shots", type=int, default=None, help="separate tail (§6.3): examples per class, taken out of "
      "the training shots, that form the last inner mini-batch (default: inner batch / ways, at least 1)")
    a("--algorithm", choices=["reptile", "fomaml"], default="reptile",
      help="reptile: meta-update g_1+...+g_k (Eq. 40); fomaml: the last inner gradient g_k (Eq. 38)")
    a("--combination", default=None, help="§6.2: which inner gradients make the meta-update, e.g. "
      "'g1', 'g2', 'g1+g2', 'g1+g2+g3+g4' (default: all k for reptile, 'gk' for fomaml)")
    a("--combine", choices=["sum", "mean"], default="sum",
      help="§6.2: sum the chosen gradients (Reptile) or average them (corrects the step size)")
    a("--tail", choices=["shared", "separate"], default=None,
      help="§6.3: the last inner mini-batch comes from the same training examples (shared) or from "
      "held-out ones (separate, as Finn et al.); default: shared for reptile, separate for fomaml")
    a("--replacement", action="store_true", help="§6.3: draw each inner mini-batch at random "
      "instead of cycling through the shuffled training examples")
    a("--inner-optimizer", choices=["adam", "sgd"], default=None, help="inner-loop update U (paper: Adam "
      "with β1 = 0 for classification §6.1, vanilla SGD for §6.2 and the sinusoid; §6.3 does not say)")
    a("--adam-beta1", type=float, default=0.0, help="inner Adam's β1 (paper: 0, 'momentum reduced performance')")
    a("--inner-lr", type=float, default=None, help="α, inner step size or Adam learning rate "
      "(paper: 0.001 Omniglot 5-way and MiniImageNet, 0.0005 20-way; sinusoid demo: SGD 0.02)")
    a("--inner-batch", type=int, default=None, help="inner mini-batch size (paper: 10 5-way, 20 20-way, 10 "
      "MiniImageNet; sinusoid demo: 10)")
    a("--inner-steps", type=int, default=None, help="k, inner iterations per task (paper: 5 5-way, 10 20-way, "
      "8 MiniImageNet; sinusoid demo: 5)")
    a("--eval-steps", type=int, default=None, help="inner iterations at test time (paper: 50; sinusoid 32)")
    a("--eval-inner-batch", type=int, default=None, help="inner mini-batch size at test time, at most "
      "the N·K support examples (paper: 5 5-way, 10 20-way, 5 / 15 MiniImageNet 1- / 5-shot)")
    a("--meta-step-size", type=float, default=None, help="ε, outer SGD step size, annealed linearly to 0 "
      "(paper: 1.0; sinusoid demo 0.1)")
    a("--meta-batch-size", type=int, default=None, help="n, tasks per meta-update, Eq. (5); 1 is "
      "Algorithm 1 (paper: 5; sinusoid demo: 1)")
    a("--iterations", type=int, default=None, help="outer iterations (paper: 100000 Omniglot 5-way and "
      "MiniImageNet, 200000 20-way; sinusoid demo 30000); fixed on --resume, since ε is annealed to 0 over it")
    a("--val-every", type=int, default=None, help="validate every this many iterations (default: iterations / 10)")
    a("--val-tasks", type=int, default=100, help="validation tasks per validation")
    a("--test-tasks", type=int, default=600, help="meta-test tasks (paper: 600 in MAML; we report mean ± 95%% CI)")
    a("--eval-chunk", type=int, default=10, help="test tasks adapted at once (speed and memory only)")
    a("--bn-mode", choices=["transductive", "nontransductive", "both"], default="both",
      help="BatchNorm statistics at test time (§6.1): the whole query batch (transductive), the "
      "support set plus one query (nontransductive), or report both; validation uses transductive")
    data.add_session_flags(p, "--inner-lr, --meta-step-size")
    a("--plot", nargs="?", const="auto", default=None, help="save a figure: the sinusoid's Fig. 1 (random "
      "init, MAML and Reptile before and after adaptation; trains MAML too) or the adaptation curve; "
      "needs matplotlib")
    a("--maml-iterations", type=int, default=10000, help="sinusoid --plot: meta-iterations of the MAML "
      "panel of Fig. 1 (maml.py's second-order MAML, its §5.1 settings)")
    return p


def task_examples(batch, cfg):
    """Each task's examples for the inner loop: the training ones, then the separate tail's (§6.3)."""
    x, y, x_tail, y_tail = batch
    if cfg.tail == "separate":
        x, y = torch.cat([x, x_tail], 1), torch.cat([y, y_tail], 1)   # (T, train + tail, ...)
    return x, y


def is_plain_reptile(cfg, k):
    """Every inner update, summed: Σ_i u_i = φ̃ − φ, so the target is φ̃_i itself."""
    return parse_combination(cfg.combination, k) == list(range(k)) and cfg.combine == "sum"


def combined_target(params, updates, cfg):
    """§6.2 / Eq. (38): φ moved by the chosen inner updates only, summed or averaged; e.g. FOMAML:
    φ + u_k = φ − α g_k."""
    chosen = parse_combination(cfg.combination, len(updates))
    scale = 1.0 / len(chosen) if cfg.combine == "mean" else 1.0
    return {k: params[k] + scale * sum(updates[i][k] for i in chosen) for k in params}


def mean_over_tasks(target, state, loss, tasks):
    """Eq. (5)'s mean of the n targets, and of the inner Adam statistics: the n tasks ran side by side
    from the same statistics (the reference code runs them one after another), so we keep their
    mean, as Eq. (5) keeps the mean of the φ̃_i. Under torchrun, over every rank's tasks. A
    non-finite inner loss stops every rank before φ moves."""
    mean_target, state = {k: v.mean(0) for k, v in target.items()}, map_state(state, lambda v: v.mean(0))
    inner = loss.sum().double().reshape(1)        # all-reduced too, so that a NaN stops every torchrun rank
    data.all_reduce_mean(list(mean_target.values()) + state_tensors(state) + [inner], tasks)
    if not torch.isfinite(inner).all():
        raise NonFiniteLoss(f"the inner loss is {inner.item()}")
    return mean_target, state


def parse_combination(text, k):
    """'g1+g3' -> [0, 2] (0-based inner steps); 'gk' means the last one."""
    out = []
    for t in text.split("+"):
        m = re.fullmatch(r"g(\d+|k)", t.strip())
        if not m:
            raise SystemExit(f"error: --combination {text!r}: each term must be g1, g2, ..., or gk, joined by '+'")
        i = k if m.group(1) == "k" else int(m.group(1))
        if not 1 <= i <= k:
            raise SystemExit(f"error: --combination {text!r} uses g{i}, but there are only "
                             f"--inner-steps {k} inner gradients g1..g{k}")
        if i - 1 in out:
            raise SystemExit(f"error: --combination {text!r} names g{i} twice")
        out.append(i - 1)
    return sorted(out)


def paper_settings(dataset, ways, shots):
    """PAPER_SETTINGS for a dataset; 5-shot tests use an inner batch of 15 (Table 4)."""
    if dataset == "sinusoid":
        return dict(PAPER_SETTINGS["sinusoid"])
    if dataset == "omniglot":
        return dict(PAPER_SETTINGS["omniglot-20way" if ways >= 20 else "omniglot-5way"])
    s = dict(PAPER_SETTINGS["miniimagenet"])       # also the default for an image folder
    if shots >= 5:
        s["eval_inner_batch"] = 15
    return s


def finalize_config(cfg):
    """Fill unset flags with the paper's settings and reject impossible combinations."""
    data.check_session_flags(cfg)
    if not 0 <= cfg.adam_beta1 < 1:
        raise SystemExit(f"error: --adam-beta1 {cfg.adam_beta1} must lie in [0, 1)")
    if cfg.shots is None:
        cfg.shots = 10 if cfg.dataset == "sinusoid" else 1
    for k, v in paper_settings(cfg.dataset, cfg.ways, cfg.shots).items():
        if getattr(cfg, k, None) is None:
            setattr(cfg, k, v)
    if cfg.tail is None:
        cfg.tail = "separate" if cfg.algorithm == "fomaml" else "shared"
    if cfg.combination is None:
        cfg.combination = ("+".join(f"g{i}" for i in range(1, cfg.inner_steps + 1))
                           if cfg.algorithm == "reptile" else "gk")
    if cfg.tail_shots is None:
        cfg.tail_shots = max(1, cfg.inner_batch // (1 if cfg.dataset == "sinusoid" else cfg.ways))
    if cfg.val_every is None:
        cfg.val_every = max(1, cfg.iterations // 10)
    if cfg.eval_steps < 1:             # data.check_numbers allows 0 (MAML's curve starts at step 0)
        raise SystemExit(f"error: --eval-steps {cfg.eval_steps}: must be at least 1")
    if cfg.tail == "separate" and cfg.dataset != "sinusoid" and cfg.tail_shots >= cfg.train_shots:
        raise SystemExit(f"error: --tail-shots {cfg.tail_shots} leaves no training examples: the "
                         f"separate tail is carved out of the --train-shots {cfg.train_shots}")
    if cfg.tail == "separate" and cfg.inner_steps < 2:
        raise SystemExit("error: --tail separate needs --inner-steps 2 or more: the last step is the "
                         "held-out batch, the ones before it adapt")
    parse_combination(cfg.combination, cfg.inner_steps)
    return cfg


def classify(params, state, problem, cfg, x_s, y_s, x_q):
    """--predict: adaptation_curve's test-time inner loop on the support set (its mini-batches drawn
    from --seed), then the queries' class probabilities (T, M, N)."""
    g = torch.Generator().manual_seed(cfg.seed)
    schedule = minibatch_schedule(1, x_s.shape[1], 0, cfg.eval_inner_batch, cfg.eval_steps, "shared", False, g)
    fast, _, _, _, _ = adapt(per_task(params, x_s.shape[0]), problem, x_s, y_s, schedule, cfg.inner_lr,
                             cfg.inner_optimizer, state, cfg.adam_beta1)
    with torch.no_grad():
        mode = "nontransductive" if cfg.bn_mode == "nontransductive" else "transductive"
        return predict(fast, problem.forward, x_s, x_q, mode).softmax(-1)


def make_problems(cfg, device, splits):
    """Two samplers over the same tasks: meta-training episodes (train_shots per class, plus
    tail_shots held-out examples per class for a separate tail) and test episodes (K shots, and
    `query` examples per class to classify)."""
    if cfg.dataset == "sinusoid":
        params = init_mlp(SINUSOID_SIZES, torch.Generator().manual_seed(cfg.seed))

        def sample(split, tasks, generator, shots=None):
            # §4: p points x ~ U[-5, 5]; the loss of Eq. (8) on 50 evenly spaced points (the query)
            b = data.sinusoid_tasks(tasks, shots or cfg.shots, 50, generator, "reptile", device)
            return b["x_support"], b["y_support"], b["x_query"], b["y_query"]

        def sample_train(tasks, generator):
            # a separate tail is the 50 even points, beside the train_shots random ones
            return sample("train", tasks, generator, shots=cfg.train_shots)
        return Problem(params, mlp_forward, mse_per_task, mse_per_task, "mse", sample), sample_train

    problem = maml.make_problem(cfg, device, splits)
    if "train" not in splits:           # --eval-only on --test-dir, or --predict
        return problem, None
    # A separate tail is carved out of the training shots, as in the authors' code: 10 shots with
    # a tail of 2 are 8 examples per class for the first k − 1 batches and 2 for the last.
    tail = cfg.tail_shots if cfg.tail == "separate" else 0
    try:
        sampler = data.EpisodeSampler(splits["train"], cfg.ways, cfg.train_shots - tail, tail, device, "train",
                                      cfg.rotate_tasks)
    except data.DataError as e:
        raise data.DataError(f"{e} (meta-training episodes use --train-shots {cfg.train_shots} per "
                             f"class, {tail} of them the separate tail)") from None
    return problem, sampler.sample


# Flags that do not change what training computes, so they may differ on --resume / --load.
# K (shots) is one of them: meta-training sees --train-shots, whatever K is at test time, so one
# model serves 1-shot and 5-shot tests (App. A uses the same training for both). --iterations is
# not one of them: ε is annealed to 0 over it. The step sizes may change on --resume, so that a run
# that diverged can go on from its last good checkpoint. data.parse_args merges the config, as for every script.
OVERRIDABLE_FLAGS = {"maml_iterations", "test_tasks", "eval_chunk", "bn_mode", "test_dir", "data_dir",
                     "eval_steps", "eval_inner_batch", "val_tasks", "query", "shots", "inner_lr", "meta_step_size"}


def train(cfg, problem, sample_train, state):
    """Alg. 1 / Eq. (5): meta-train φ (and its inner Adam statistics, which the paper keeps)."""
    device = torch.device(cfg.device)
    params = {k: v.to(device) for k, v in state["params"].items()}
    inner_state = map_state(state["inner_state"], lambda v: v.to(device))
    task_gen = torch.Generator().manual_seed(cfg.seed)
    batch_gen = torch.Generator().manual_seed(cfg.seed + 1)
    if "rng" in state:  # resuming
        task_gen.set_state(state["rng"]["tasks"])
        batch_gen.set_state(state["rng"]["batches"])
    history = state.get("history", [])
    running = state.get("running")   # smoothed loss and metric of the last inner mini-batch

    def validate():
        line = {"train_loss": round(running[0], 5), f"train_{problem.metric_name}": round(running[1], 5)}
        if problem.has_val:
            curve = evaluate(params, problem, "val", cfg.val_tasks, cfg.seed + 1, cfg, inner_state,
                             ["transductive"])["transductive"]
            line[f"val_{problem.metric_name}"] = round(float(curve[-1].mean()), 5)
        return line

    def checkpoint(iteration):
        return {"algorithm": "reptile", "format": 1, "params": {k: v.cpu() for k, v in params.items()},
                "inner_state": map_state(inner_state, torch.Tensor.cpu),
                "config": vars(cfg), "iteration": iteration, "history": history, "running": running,
                "rng": {"tasks": task_gen.get_state(), "batches": batch_gen.get_state()}}

    # the progress bar, validation, checkpoints and stops: data.Training
    with data.Training(cfg, state["iteration"], history, validate, checkpoint, "meta-train",
                       "--inner-lr or --meta-step-size") as loop:
        for it in loop:                                                   # Alg. 1 line 2: for iteration = 1, 2, ...
            # line 3: sample n tasks, each with train_shots examples per class (+ a held-out tail)
            batch = sample_train(cfg.meta_batch_size, task_gen)
            n_train, n_tail = batch[0].shape[1], batch[2].shape[1]
            schedule = minibatch_schedule(cfg.meta_batch_size, n_train, n_tail, cfg.inner_batch,
                                          cfg.inner_steps, cfg.tail, cfg.replacement, batch_gen)
            batch, schedule = data.rank_tasks(batch), data.rank_tasks(schedule)     # torchrun: this rank's tasks
            # lines 4-5 and Eq. (5): k inner steps per task, then φ ← φ + ε (mean of W_i − φ)
            params, inner_state, loss, metric = meta_step(params, inner_state, problem, batch, cfg, schedule,
                                                          epsilon_at(cfg, it))
            loss, metric = loss.mean().item(), metric.mean().item()
            running = (loss, metric) if running is None else (0.98 * running[0] + 0.02 * loss,
                                                              0.98 * running[1] + 0.02 * metric)
            loop.show({"loss": f"{running[0]:.4f}", problem.metric_name: f"{running[1]:.4f}",
                       "eps": f"{epsilon_at(cfg, it):.3f}"})
    return loop.state


def train_maml_sinusoid(cfg, problem):
    """The MAML panel of Fig. 1: maml.py's second-order MAML with its §5.1 settings (1 step,
    α = 0.001 as the authors ran it, Adam 1e-3, 25 tasks) on the same 1→64→64→1 network and the
    same §4 tasks (K points, loss on the 50 even points). Returns its φ and α: it is fine-tuned at
    test with its own α, since MAML learns an initialization for that step size, and Reptile's
    α = 0.02 makes its 32 steps diverge."""
    from tqdm import tqdm
    s = maml.paper_settings("sinusoid", 1, 10)
    mcfg = argparse.Namespace(inner_steps=s["inner_steps"], inner_lr=s["inner_lr"], first_order=False,
                              task_chunk=None)
    g = torch.Generator().manual_seed(cfg.seed + 200)
    params = {k: v.to(cfg.device).requires_grad_() for k, v in init_mlp(SINUSOID_SIZES, g).items()}
    optimizer = torch.optim.Adam(params.values(), lr=s["outer_lr"])
    for _ in tqdm(range(cfg.maml_iterations), desc="MAML for Fig. 1", dynamic_ncols=True, mininterval=0.5):
        maml.meta_step(params, optimizer, problem, problem.sample("train", s["meta_batch_size"], g), mcfg)
    return {k: v.detach() for k, v in params.items()}, mcfg.inner_lr


def plot_sinusoid(path, cfg, problem, models):
    """Fig. 1: one test sinusoid, K sampled points, each initialization before and after k test
    steps. models: {name: (φ, α, inner optimizer, its state)}, as in main()."""
    g = torch.Generator().manual_seed(cfg.seed + 3)
    b = data.sinusoid_tasks(1, cfg.shots, 1, g, "reptile")
    while b["amplitude"][0] < 2.5:   # a wave tall enough to show the fit (A ~ U[0.1, 5])
        b = data.sinusoid_tasks(1, cfg.shots, 1, g, "reptile")
    grid = torch.linspace(-5, 5, 200).reshape(1, 200, 1)
    truth = b["amplitude"] * torch.sin(grid - b["phase"])
    schedule = minibatch_schedule(1, cfg.shots, 0, cfg.eval_inner_batch, cfg.eval_steps, "shared", False, g)
    columns = []
    for name, (params, lr, optimizer, state) in models.items():
        fast = per_task({k: v.detach().cpu() for k, v in params.items()}, 1)
        after = adapt(fast, problem, b["x_support"], b["y_support"], schedule, lr, optimizer,
                      map_state(state, torch.Tensor.cpu), cfg.adam_beta1)[0]
        with torch.no_grad():
            columns.append((f"{name} (α = {lr})", [("before", "--", mlp_forward(fast, grid)),
                                                    (f"after {cfg.eval_steps} steps", "-", mlp_forward(after, grid))]))
    data.plot_fits(path, grid, truth, b["x_support"], b["y_support"], columns)


def main(argv=None):
    data.keep_freed_memory()
    # --iterations may change only for a test: ε is annealed to 0 over it
    args, saved, given = data.parse_args(build_parser(), argv, "reptile", overridable=OVERRIDABLE_FLAGS,
                                         test_overridable={"iterations"})
    if "tail_shots" in given and args.dataset == "sinusoid":
        raise SystemExit("error: --tail-shots is for classification; the sinusoid's separate tail is its 50 "
                         "even points (§4)")
    cfg = finalize_config(args)
    data.setup_distributed(cfg, "reptile.py")
    print("config: " + " ".join(f"{k}={v}" for k, v in vars(cfg).items()))
    seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    try:
        splits = load_splits(cfg)
        problem, sample_train = make_problems(cfg, device, splits)
    except data.DataError as e:
        raise SystemExit(f"error: {e}") from None

    if saved:
        data.check_fit(saved, problem.params, cfg)
        state = saved
    else:
        adam = init_inner_state(problem.params) if cfg.inner_optimizer == "adam" else None
        state = {"params": problem.params, "inner_state": adam, "iteration": 0}

    started = time.time()
    if not cfg.eval_only:
        state = train(cfg, problem, sample_train, state)
    if data.RANK != 0:       # torchrun: rank 0 alone tests and writes
        return None
    train_seconds = time.time() - started
    params = {k: v.to(device) for k, v in state["params"].items()}
    inner_state = map_state(state["inner_state"], lambda v: v.to(device))
    if cfg.predict:
        return data.run_predict(cfg, partial(classify, params, inner_state, problem, cfg))
    results = {"config": vars(cfg), "train_seconds": round(train_seconds, 1),
               "iteration": state["iteration"], "history": state.get("history", [])}

    started = time.time()
    if cfg.dataset == "sinusoid":
        # name: (φ, α, inner optimizer, its state); Fig. 1's other two are fine-tuned with SGD, as MAML's are
        models = {"Reptile": (params, cfg.inner_lr, cfg.inner_optimizer, inner_state)}
        if cfg.plot:
            random_init = init_mlp(SINUSOID_SIZES, torch.Generator().manual_seed(cfg.seed + 100))
            models = {"random init": (random_init, cfg.inner_lr, "sgd", None),
                      "MAML": (*train_maml_sinusoid(cfg, problem), "sgd", None), **models}
        print(f"\nsinusoid (§4): MSE on 50 even points ± 95% CI, {cfg.test_tasks} test tasks, "
              f"K = {cfg.shots} points, after k steps")
        results["test"] = {}
        for name, (p, lr, optimizer, inner) in models.items():
            test_cfg = argparse.Namespace(**{**vars(cfg), "inner_lr": lr, "inner_optimizer": optimizer})
            p = {k: v.to(device) for k, v in p.items()}   # the random init was drawn on the CPU
            curve = evaluate(p, problem, "test", cfg.test_tasks, cfg.seed + 2, test_cfg, inner,
                             ["transductive"])["transductive"]
            steps = curve_steps(cfg.eval_steps)
            print(f"  {name + f' α={lr}':<18} " + data.format_curve(curve, steps))
            results["test"][name] = {"inner_lr": lr, "steps": steps, "mse_by_step": [mean_ci(r) for r in curve]}
        m, c = mean_ci(curve[-1])   # Reptile's, the last model
        print(f"test_mse={m:.4f} ci95={c:.4f} steps={cfg.eval_steps}")
    else:
        modes = ["transductive", "nontransductive"] if cfg.bn_mode == "both" else [cfg.bn_mode]
        curves = evaluate(params, problem, "test", cfg.test_tasks, cfg.seed + 2, cfg, inner_state, modes)
        print(f"\nmeta-test: {cfg.test_tasks} tasks, {cfg.ways}-way {cfg.shots}-shot, {cfg.eval_steps} "
              f"inner steps ({cfg.inner_optimizer}, α = {cfg.inner_lr}, batch {cfg.eval_inner_batch}), "
              f"accuracy ± 95% CI after k steps:")
        results["test"] = {}
        for mode, curve in curves.items():
            m, c = mean_ci(curve[-1])
            steps = curve_steps(cfg.eval_steps, mode)
            print(f"  {mode:<16} " + data.format_curve(curve, steps))
            print(f"test_acc_{mode}={m:.4f} ci95={c:.4f} steps={cfg.eval_steps}")
            results["test"][mode] = {"steps": steps, "accuracy_by_step": [mean_ci(r) for r in curve],
                                     "accuracy": m, "ci95": c}
    results["eval_seconds"] = round(time.time() - started, 1)
    data.write_results(cfg.out, results)
    if cfg.plot and cfg.dataset == "sinusoid":
        plot_sinusoid("reptile_sinusoid.png" if cfg.plot == "auto" else cfg.plot, cfg, problem, models)
    elif cfg.plot:
        data.plot_curves("reptile_curve.png" if cfg.plot == "auto" else cfg.plot,
                         [(mode, r["steps"], r["accuracy_by_step"]) for mode, r in results["test"].items()],
                         f"{cfg.dataset} {cfg.ways}-way {cfg.shots}-shot, {cfg.algorithm}")
    return results


if __name__ == "__main__":
    data.run(main)
