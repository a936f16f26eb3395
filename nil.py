"""nil.py: NIL (No Inner Loop), which is ANIL with the head removed at test time.

Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse? Towards Understanding the
Effectiveness of MAML", ICLR 2020, §4 and Appendix F (sections as numbered in the
arXiv text; the ICLR 2020 version numbers NIL §5). Training is anil.py's (imported); only the
test-time classifier is new:

    §4 step 1          train with ANIL (maml.train, anil.adapt), or load an anil.py / maml.py checkpoint  main()
    §4 step 2          drop the head; embed support and query sets with the body         nil_predict()
    §4 step 2, [30]    ŷ = Σ_i softmax_i(cos(f(x̂), f(x_i))) y_i  (matching networks)     cosine_classify()
    Table 1 (bottom)   NIL accuracy next to the head's (ANIL or MAML) on the same tasks  main()
    App. F, Table 5    bodies from MAML, ANIL, multiclass and multitask training and     head_body_table()
                       random init, each tested with a MAML head and with a NIL head

Symbols (as in maml.py and anil.py):
    θ_body, θ_head   the network without its last layer, and the last layer
    f(x)             the body's features (penultimate layer), which NIL compares by cosine
    N, K, Q          ways, shots, query        α inner_lr, β outer_lr, T meta_batch_size

Run:    python nil.py --data-dir DIR                       (Omniglot: ANIL training, then NIL vs ANIL)
        python nil.py --eval-only --load anil.pt            (NIL vs the checkpoint's own head)
        python nil.py --eval-only --load anil.pt --head-body --maml-checkpoint maml.pt
"""

import argparse
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import anil
import data
import maml
from data import mean_ci, task_batches
from maml import per_task, predict


# ---------------------------------------------------------------------------------------------
# The paper's numbers, for the printouts: Table 1 (bottom), and Table 5 (MiniImageNet 5w1s / 5w5s)
# ---------------------------------------------------------------------------------------------
PAPER_NIL = {"omniglot-20": "MAML 93.7 ± 0.7, ANIL 96.2 ± 0.5, NIL 96.7 ± 0.3 (Omniglot 20-way 1-shot)",
             "miniimagenet-1": "MAML 46.9 ± 0.2, ANIL 46.7 ± 0.4, NIL 48.0 ± 0.7",
             "miniimagenet-5": "MAML 63.1 ± 0.4, ANIL 61.5 ± 0.5, NIL 62.2 ± 0.5"}
PAPER_TABLE5 = {("MAML training", "MAML head"): "46.9 / 63.1", ("MAML training", "NIL head"): "48.4 / 61.5",
                ("ANIL training", "ANIL head"): "46.7 / 61.5", ("ANIL training", "NIL head"): "48.0 / 62.2",
                ("Multiclass pretrain", "MAML head"): "38.4 / 54.6", ("Multiclass pretrain", "NIL head"): "39.7 / 54.4",
                ("Multitask pretrain", "MAML head"): "26.5 / 32.8", ("Multitask pretrain", "NIL head"): "26.5 / 34.2",
                ("Random features", "MAML head"): "32.1 / 43.1", ("Random features", "NIL head"): "32.9 / 43.2"}


# ---------------------------------------------------------------------------------------------
# NIL's test-time classifier (§4): ANIL's body, no head, the cosine vote
# ---------------------------------------------------------------------------------------------

def cosine_classify(f_s, y_s, f_q, ways):
    """Matching networks' attention classifier ([30], their Eq. 1-2) on body features:
    a(x̂, x_i) = softmax_i cos(f(x̂), f(x_i)), ŷ = Σ_i a(x̂, x_i) y_i (one-hot y_i).
    f_s (T, N*K, D), y_s (T, N*K), f_q (T, M, D) -> class probabilities (T, M, N)."""
    cos = F.normalize(f_q, dim=-1) @ F.normalize(f_s, dim=-1).transpose(1, 2)    # (T, M, N*K)
    return cos.softmax(dim=-1) @ F.one_hot(y_s, ways).to(cos.dtype)


def nil_predict(params, net, x_s, y_s, x_q, ways, bn_mode="transductive"):
    """§4: the head is never used. The support and query sets go through the body alone, with
    the same BatchNorm batches as maml.predict (transductive: the query set together)."""
    f_s = net.body(params, x_s)                                                  # (T, N*K, D)
    f_q = predict(params, net.body, x_s, x_q, bn_mode)                           # (T, M, D)
    return cosine_classify(f_s, y_s, f_q, ways)


def nil_accuracy(params, problem, net, batches, ways, bn_mode):
    """Per-task NIL query accuracy (no inner loop: one pass, no gradients)."""
    out = []
    with torch.no_grad():
        for x_s, y_s, x_q, y_q in batches:
            probs = nil_predict(per_task(params, x_s.shape[0]), net, x_s, y_s, x_q, ways, bn_mode)
            out.append(problem.metric(probs, y_q).cpu())
    return torch.cat(out).numpy()


def accuracies(cfg, problem, net, params, algorithm):
    """Per-task accuracy on maml.py's test tasks (seed + 2) of the trained head, after the model's own
    test-time inner loop (ANIL adapts the head only, MAML every layer), and of NIL on the same tasks."""
    head = maml.evaluate(params, problem, "test", cfg.test_tasks, cfg.seed + 2, cfg,
                         anil.adapt if algorithm == "anil" else maml.adapt)[-1]
    batches = task_batches(problem, "test", cfg.test_tasks, cfg.eval_chunk, cfg.seed + 2)
    return head, nil_accuracy(params, problem, net, batches, cfg.ways, cfg.bn_mode)


# ---------------------------------------------------------------------------------------------
# App. F, Table 5: which training gives the body good features?
# ---------------------------------------------------------------------------------------------

def fresh_head(params, ways, generator):
    """A new N-way head with maml.init_convnet's initialization (uniform ±1/√D, zero bias)."""
    dim = params["fc.w"].shape[0]
    bound = 1.0 / dim ** 0.5
    return {"fc.w": (torch.rand(dim, ways, generator=generator) * 2 - 1) * bound, "fc.b": torch.zeros(ways)}


def multiclass_pretrain(cfg, init, net, split, generator):
    """A standard classifier over all training classes (App. F): body + one (D, C)-head, Adam on
    cross-entropy over random batches of training images. Returns the body."""
    labels = torch.repeat_interleave(torch.arange(split.num_classes), split.counts)
    images = split.images.to(cfg.device)
    params = {**init, **fresh_head(init, split.num_classes, generator)}
    params = {k: v.clone().to(cfg.device).requires_grad_() for k, v in params.items()}
    optimizer = torch.optim.Adam(params.values(), lr=cfg.outer_lr)
    for _ in tqdm(range(cfg.pretrain_iterations), desc="multiclass pretraining", dynamic_ncols=True, mininterval=1):
        idx = torch.randint(len(labels), (cfg.pretrain_batch,), generator=generator)
        x = images[idx].float().div_(255.0).unsqueeze(0)                           # (1, B, C, H, W)
        loss = F.cross_entropy(net(per_task(params, 1), x)[0], labels[idx].to(cfg.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    print(f"multiclass pretraining: {cfg.pretrain_iterations} steps of {cfg.pretrain_batch} images over "
          f"{split.num_classes} classes, final batch loss {loss.item():.3f}")
    return {k: v.detach() for k, v in params.items() if k not in net.head_keys}


def multitask_pretrain(cfg, problem, init, generator):
    """Multitask training (App. F): one shared N-way head over all training tasks and no inner loop,
    so label j means a different class in every task (the labels are not aligned). This is
    maml.pretrain_step, the sinusoid baseline of MAML §5.1, on episodes."""
    params = {k: v.clone().to(cfg.device).requires_grad_() for k, v in init.items()}
    optimizer = torch.optim.Adam(params.values(), lr=cfg.outer_lr)
    for _ in tqdm(range(cfg.pretrain_iterations), desc="multitask training", dynamic_ncols=True, mininterval=1):
        loss = maml.pretrain_step(params, optimizer, problem, problem.sample("train", cfg.meta_batch_size, generator))
    print(f"multitask training: {cfg.pretrain_iterations} steps of {cfg.meta_batch_size} tasks, final loss {loss:.3f}")
    return {k: v.detach() for k, v in params.items()}


def train_head(cfg, problem, net, body, generator):
    """App. F: 'initialize a new N-class head, and train that (on top of the frozen features) with
    MAML'. Only the head is in the optimizer, so this is anil.meta_step with the body frozen."""
    head = {k: v.to(cfg.device).requires_grad_() for k, v in fresh_head(problem.params, cfg.ways, generator).items()}
    optimizer = torch.optim.Adam(head.values(), lr=cfg.outer_lr)
    frozen = {k: v.to(cfg.device) for k, v in body.items() if k not in net.head_keys}
    for _ in tqdm(range(cfg.head_iterations), desc="MAML head on a frozen body", dynamic_ncols=True, mininterval=1):
        anil.meta_step(frozen | head, optimizer, problem, problem.sample("train", cfg.meta_batch_size, generator), cfg)
    return frozen | {k: v.detach() for k, v in head.items()}


def head_body_table(cfg, problem, net, splits, init, rows):
    """Table 5 on the same test tasks. `rows` holds main()'s accuracies of the meta-trained bodies
    (ANIL, and MAML with --maml-checkpoint); `init` is the seed's initialization, where the
    multiclass and multitask bodies start and the random body stays."""
    g = torch.Generator().manual_seed(cfg.seed + 10)
    multiclass = multiclass_pretrain(cfg, init, net, splits["train"], g)
    bodies = {"Multiclass pretrain": train_head(cfg, problem, net, multiclass, g)}
    multitask = multitask_pretrain(cfg, problem, init, g)
    bodies["Multitask pretrain"] = train_head(cfg, problem, net, multitask, g)
    bodies["Random features"] = train_head(cfg, problem, net, init, g)
    for name, params in bodies.items():
        rows[name, "MAML head"], rows[name, "NIL head"] = accuracies(cfg, problem, net, params, "anil")
    rows = {k: rows[k] for k in PAPER_TABLE5 if k in rows}         # the paper's order
    print(f"\nHead/body study (App. F, Table 5): {cfg.dataset} {cfg.ways}-way {cfg.shots}-shot, accuracy ± 95% CI "
          f"over the same {cfg.test_tasks} test tasks. Non-meta-learned bodies are frozen; their MAML head is "
          f"meta-trained for {cfg.head_iterations} iterations and adapts alone at test time")
    print(f"{'body':<20} {'head':<10} {'ours':>17}   paper MiniImageNet 5w1s / 5w5s")
    for (body, head), values in rows.items():
        m, c = mean_ci(values)
        print(f"{body:<20} {head:<10} {m:8.4f} ± {c:.4f}   {PAPER_TABLE5[body, head]}")
    if ("MAML training", "MAML head") not in rows:
        print("MAML training: not run (give --maml-checkpoint)")
    return {f"{b} / {h}": mean_ci(v) for (b, h), v in rows.items()}


# ---- Below: what the paper does not contain: command line, checkpoints (training is maml.train with anil.adapt) ----

NIL_FLAGS = {"head_body", "maml_checkpoint", "pretrain_iterations", "pretrain_batch", "head_iterations"}


def build_parser():
    p = maml.build_parser()
    p.description = ("NIL (Raghu et al. 2020, §4): ANIL training, then a test with no head and no inner loop. "
                     "Flags left unset take MAML's paper values (App. C).")
    p.set_defaults(dataset="omniglot")         # NIL is a classifier: no sinusoid
    a = p.add_argument
    a("--head-body", action="store_true", help="App. F, Table 5: bodies from MAML / ANIL training, multiclass "
      "pretraining, multitask training and random init, each with a MAML head and a NIL head")
    a("--maml-checkpoint", default=None, help="maml.py checkpoint tested on the same tasks: next to ANIL and NIL, "
      "and as the 'MAML training' rows of --head-body")
    a("--pretrain-iterations", type=int, default=1000, help="--head-body: Adam steps of multiclass and multitask "
      "training of a body (paper: not stated)")
    a("--pretrain-batch", type=int, default=64, help="--head-body: images per multiclass pretraining step")
    a("--head-iterations", type=int, default=500, help="--head-body: meta-iterations that train a new N-way head "
      "with MAML on a frozen body (App. F: 'train that [head] with MAML')")
    return p


def main(argv=None):
    data.keep_freed_memory()
    cfg, saved = anil.parse(build_parser(), argv, anil.ANALYSIS_FLAGS | NIL_FLAGS)
    data.refuse_distributed("nil.py", "its baselines and head/body study run in one process; train the model "
                            "with torchrun anil.py, then test it here with --eval-only --load")
    if cfg.dataset == "sinusoid":
        raise SystemExit("error: NIL classifies by cosine similarity to labelled support examples; "
                         "use --dataset omniglot, miniimagenet or folder")
    problem, net, state = anil.setup(cfg, saved)
    if cfg.predict:     # §4: no head and no inner loop, so a support set of any number of classes
        params = per_task({k: v.to(cfg.device) for k, v in state["params"].items()}, 1)

        def vote(x_s, y_s, x_q):
            with torch.no_grad():
                return nil_predict(params, net, x_s, y_s, x_q, int(y_s.max()) + 1, cfg.bn_mode)
        return data.run_predict(cfg, vote, any_ways=True)
    init = problem.params          # the seed's initialization (training works on a copy)
    # a maml.py checkpoint comes only with --eval-only: anil.parse lets --resume continue ANIL alone
    algorithm = saved.get("algorithm", "maml") if saved else "anil"
    other = data.load_checkpoint(cfg.maml_checkpoint) if cfg.maml_checkpoint else None   # checked before any run
    if other and algorithm != "anil":
        raise SystemExit(f"error: --maml-checkpoint compares an ANIL model with MAML, but {cfg.load} is "
                         f"itself a {algorithm}.py checkpoint")
    if other and (data.checkpoint_algorithm(other) != "maml" or set(other["params"]) != set(problem.params) or any(
            other["params"][k].shape != v.shape for k, v in problem.params.items())):
        raise SystemExit(f"error: {cfg.maml_checkpoint} is not a maml.py checkpoint of this model "
                         f"(dataset {cfg.dataset}, ways {cfg.ways})")
    started = time.time()
    if not cfg.eval_only:
        state = maml.train(cfg, problem, state, anil.adapt, "anil")
    results = {"config": vars(cfg), "algorithm": algorithm, "train_seconds": round(time.time() - started, 1),
               "iteration": state["iteration"], "history": state.get("history", [])}
    params = {k: v.to(cfg.device) for k, v in state["params"].items()}

    # §4 / Table 1: NIL and the trained head on the same test tasks (seed + 2, maml.py's tasks)
    head, nil = accuracies(cfg, problem, net, params, algorithm)
    (hm, hc), (nm, nc), (dm, dc) = mean_ci(head), mean_ci(nil), mean_ci(nil - head)
    print(f"\nmeta-test: the same {cfg.test_tasks} tasks, {cfg.ways}-way {cfg.shots}-shot, {cfg.bn_mode} BatchNorm")
    print(f"  {algorithm.upper()} head ({cfg.eval_steps} steps, α = {cfg.inner_lr}): {hm:.4f} ± {hc:.4f}")
    print(f"  NIL (no head, cosine)          : {nm:.4f} ± {nc:.4f}")
    print(f"  NIL − {algorithm.upper()} per task         : {dm:+.4f} ± {dc:.4f}")
    paper = PAPER_NIL.get(f"{cfg.dataset}-{cfg.ways if cfg.dataset == 'omniglot' else cfg.shots}")
    if paper:
        print(f"  paper: {paper}")
    results["test"] = {"nil": {"accuracy": nm, "ci95": nc}, f"{algorithm}_head": {"accuracy": hm, "ci95": hc},
                       "nil_minus_head": {"mean": dm, "ci95": dc}}
    trained = f"{algorithm.upper()} training"
    rows = {(trained, f"{algorithm.upper()} head"): head, (trained, "NIL head"): nil}    # Table 5's rows
    if other:
        # Table 1: MAML on the same tasks, for ANIL ≈ MAML as a paired comparison; MAML keeps its own α and steps
        own = argparse.Namespace(**(vars(cfg) | {k: other["config"][k] for k in ("inner_lr", "eval_steps")}))
        maml_params = {k: v.to(cfg.device) for k, v in other["params"].items()}
        reference, rows["MAML training", "NIL head"] = accuracies(own, problem, net, maml_params, "maml")
        rows["MAML training", "MAML head"] = reference
        (mm, mc), (am, ac) = mean_ci(reference), mean_ci(head - reference)
        print(f"  MAML head ({own.eval_steps} steps, α = {own.inner_lr}, {cfg.maml_checkpoint}): {mm:.4f} ± {mc:.4f}")
        print(f"  ANIL − MAML per task         : {am:+.4f} ± {ac:.4f}")
        results["test"]["maml_head"] = {"accuracy": mm, "ci95": mc}
        results["test"]["anil_minus_maml"] = {"mean": am, "ci95": ac}
    print(f"test_acc={nm:.4f} ci95={nc:.4f} head_acc={hm:.4f} head_ci95={hc:.4f}")
    if cfg.head_body:
        results["head_body"] = head_body_table(cfg, problem, net, problem.splits, init, rows)
    return data.write_results(cfg.out, results)


if __name__ == "__main__":
    data.run(main)
