"""anil.py: ANIL (Almost No Inner Loop), which is MAML with the inner loop restricted to the head.

Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse? Towards Understanding the
Effectiveness of MAML", ICLR 2020 (sections as numbered in its arXiv text; the ICLR version's
freezing section is §3). The model, data, evaluation and checkpoints are maml.py's
(imported, not copied), and training is maml.train with ANIL's adapt() passed in, so the lines
that differ from maml.py are the paper's idea (diff adapt() against maml.adapt: same arguments):

    App. E.1          θ'_m = (θ_1, ..., θ_{l-1}, (θ_l)_{m-1} − α ∇θ_l L_S): the head alone adapts  adapt()
    App. A            L_meta(θ) = Σ_b L_Z_b(f_θ'_m), the outer loop updates every layer       meta_loss()
    App. E.2, Eq. 10  the second-order term reaches the body through the head's update     tests/test_anil.py
    Table 1, E.5      meta-RL: adapt_policy() adapts the policy's head; rl.py does the rest    (--env)
    §2, App. D.1      freezing: a block of body layers gets no inner-loop update at test    freeze_table()
    App. D.2, Fig. 4  CCA and CKA of each layer's activations before vs after the inner loop similarity()
    App. D.3, Fig. 5  per-layer Euclidean distance between θ and θ' after the inner loop   similarity()
    App. E.6, Table 4 ms per training step and per inference: MAML, FOMAML, ANIL            timing()

Symbols (as in maml.py):
    θ        params           meta-parameters: the body (conv1-4, bn1-4) and the head θ_head (fc)
    θ'       fast             adapted parameters, one copy per task; in ANIL only θ'_head differs from θ
    α        inner_lr         inner-loop step size             β   outer_lr         Adam step size
    N, K, Q  ways, shots, query                                T   meta_batch_size  tasks per update

Run:    python anil.py                                    (sinusoid regression, CPU, about 1.5 minutes)
        python anil.py --dataset omniglot --ways 20 --data-dir DIR
        python anil.py --load maml.pt --eval-only --freeze-table --similarity --plot sim.png
        python anil.py --timing                           (Table 4 on random tensors, no data)
        python anil.py --env navigation2d                 (meta-RL, Table 1; see rl.py)
        python anil.py --help                             (every flag with its paper symbol and value)
"""

from functools import partial
import re
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import data
import maml
from data import mean_ci
from maml import per_task


# ---------------------------------------------------------------------------------------------
# The paper's numbers, for the printouts (the settings are MAML's, App. C / E.5)
# ---------------------------------------------------------------------------------------------
# Table 4 (App. E.6): seconds on a Titan Xp, TensorFlow; the paper's speed-ups are ratios of the means.
PAPER_TIMING = {("train", 1): {"MAML": 0.15, "FOMAML": 0.089, "ANIL": 0.084},
                ("train", 5): {"MAML": 0.68, "FOMAML": 0.40, "ANIL": 0.37},
                ("inference", 1): {"MAML": 0.083, "ANIL": 0.020},
                ("inference", 5): {"MAML": 0.37, "ANIL": 0.076}}

# Table 2 (App. D.1), MiniImageNet 5-way 1-shot / 5-shot, for the printout.
PAPER_FREEZE = {"none": "44.5 / 61.7", "1": "44.8 / 61.7", "1-2": "44.8 / 61.4",
                "1-3": "44.7 / 60.2", "1-4": "44.7 / 60.2"}

# ---------------------------------------------------------------------------------------------
# The model, split as the paper splits it (§2): the body is every layer but the last, the head
# is the last layer. The conv body is maml.conv_body itself; the MLP body is maml.mlp_forward
# without its last layer.
# ---------------------------------------------------------------------------------------------

def mlp_body(params, x, layers, activations=None):
    """maml.mlp_forward without its last layer: x (T, B, 1) -> features (T, B, 40)."""
    h = x
    for i in range(1, layers):
        h = F.relu(torch.baddbmm(params[f"fc{i}.b"].unsqueeze(1), h, params[f"fc{i}.w"]))
        if activations is not None:
            activations.append(h)
    return h


def linear_head(w_key, b_key):
    def head(params, features):                                      # (T, B, D) -> (T, B, N)
        return torch.baddbmm(params[b_key].unsqueeze(1), features, params[w_key])
    return head


@dataclass
class Net:
    body: Callable        # body(params, x (T, B, ...), activations=None) -> features (T, B, D)
    head: Callable        # head(params, features) -> outputs (T, B, N), uses only head_keys
    head_keys: tuple      # θ_head, the parameters of the final layer
    layer_names: tuple    # body layers then "head", for the per-layer analyses

    def __call__(self, params, x):
        return self.head(params, self.body(params, x))

    def layer_outputs(self, params, x):
        """Each body layer's output, then the head's: the activations that App. D.2 compares."""
        outputs = []
        features = self.body(params, x, activations=outputs)         # appends each body layer's output
        return outputs + [self.head(params, features)]


def make_net(cfg, problem):
    if cfg.dataset == "sinusoid":
        layers = len(problem.params) // 2
        keys = (f"fc{layers}.w", f"fc{layers}.b")
        body = partial(mlp_body, layers=layers)
        names = tuple(f"fc{i}" for i in range(1, layers)) + ("head",)
    else:
        keys = ("fc.w", "fc.b")
        max_pool = cfg.dataset != "omniglot"      # as maml.make_problem: MiniImageNet-style nets pool
        body = partial(maml.conv_body, max_pool=max_pool)
        names = ("conv1", "conv2", "conv3", "conv4", "head")
    return Net(body, linear_head(*keys), keys, names)


# ---------------------------------------------------------------------------------------------
# The algorithm: ANIL's inner loop (App. E.1) and the meta-update (App. A, as maml.py)
# ---------------------------------------------------------------------------------------------

def adapt(params, net, loss_fn, x, y, inner_steps, inner_lr, first_order):
    """θ' for every task of the batch: the head takes `inner_steps` steps, the body none.
    maml.adapt with three changes, in six lines: the body's features are computed once, outside the
    loop (the body does not change); the gradient is taken w.r.t. the head only, so the inner
    backward pass stops at the features (the savings of Table 4); the body comes back untouched."""
    features = net.body(params, x)                                   # (T, N*K, D)
    head = {k: params[k] for k in net.head_keys}
    for _ in range(inner_steps):
        inner_loss = loss_fn(net.head(head, features), y).sum()
        # ∇ w.r.t. θ_head alone. Second-order ANIL keeps this gradient's graph, which runs through
        # `features` into the body: that is how the body's outer gradient gets the second-order
        # term of App. E.2, Eq. (10). First-order ANIL treats the gradient as a constant.
        grads = torch.autograd.grad(inner_loss, list(head.values()), create_graph=not first_order)
        # App. E.1: (θ_l)_m = (θ_l)_{m-1} − α ∇_{θ_l} L_S(θ_{m-1}); θ_1, ..., θ_{l-1} stay as they are
        head = {k: w - inner_lr * g for (k, w), g in zip(head.items(), grads)}
    return {**params, **head}      # the body entries are θ's own tensors: bit-identical


def meta_loss(params, problem, batch, cfg):
    """L_meta(θ) = Σ_b L_Z_b(f_θ'_b) on the query sets (App. A): maml.meta_loss with ANIL's inner
    loop. The gradient reaches every layer: the body directly through the query features and
    through the head's update (App. E.2). problem.forward is the Net, body and head."""
    return maml.meta_loss(params, problem, batch, cfg, adapt)


def meta_step(params, optimizer, problem, batch, cfg):
    """θ ← θ − β ∇θ L_meta(θ) with Adam, every layer (App. A): maml.meta_step with ANIL's inner loop."""
    return maml.meta_step(params, optimizer, problem, batch, cfg, adapt)


POLICY_HEAD = ("fc3.w", "fc3.b", "log_std")


def adapt_policy(params, episodes, inner_lr, first_order):
    """One REINFORCE step on the policy's head alone (maml.adapt_policy adapts every layer)."""
    import rl     # meta-RL only: rl.py needs gymnasium
    net = Net(rl.policy_body, rl.policy_head, POLICY_HEAD, ("fc1", "fc2", "head"))
    return adapt(params, net, rl.reinforce_loss, rl.flat_obs(episodes), episodes, 1, inner_lr, first_order)


# ---------------------------------------------------------------------------------------------
# Evaluation: maml.evaluate with ANIL's inner loop (the head adapts, the body is reused)
# ---------------------------------------------------------------------------------------------

def evaluate(params, problem, split, tasks, seed, cfg):
    """ANIL's test: maml.evaluate with the head-only inner loop. seed + 2 gives maml.py's test tasks."""
    return maml.evaluate(params, problem, split, tasks, seed, cfg, adapt)


# ---------------------------------------------------------------------------------------------
# §2 / App. D.1: freezing layers at test time (Table 2); §3 in the ICLR 2020 version
# ---------------------------------------------------------------------------------------------

def body_layers(params, net):
    """{1: ['conv1.w', 'bn1.w', 'bn1.b'], 2: [...], ...}: the body's parameters by layer."""
    layers = {}
    for k in params:
        if k not in net.head_keys:
            layers.setdefault(int(re.search(r"(\d+)\.", k).group(1)), []).append(k)
    return dict(sorted(layers.items()))


def adapt_unfrozen(params, forward, loss_fn, x, y, inner_steps, inner_lr, first_order, frozen=()):
    """MAML's inner loop (maml.adapt) over every parameter except the frozen ones, which are a
    constant of the forward: the test-time freezing of §2. frozen=() is MAML; freezing the whole
    body is ANIL's test-time inner loop."""
    held = {k: params[k] for k in frozen}
    free = {k: v for k, v in params.items() if k not in held}
    free = maml.adapt(free, lambda p, x_: forward({**held, **p}, x_), loss_fn, x, y,
                      inner_steps, inner_lr, first_order)
    return {**held, **free}


def freeze_table(cfg, problem, net, params):
    """Table 2: test accuracy with layers none, 1, 1-2, ... frozen during test-time adaptation.
    Every row sees the same test tasks (seed + 2, those of maml.py and the ANIL test)."""
    layers = list(body_layers(params, net).values())
    patterns = {("none" if n == 0 else "1" if n == 1 else f"1-{n}"): [k for layer in layers[:n] for k in layer]
                for n in range(len(layers) + 1)}
    # Not in the paper: the body's weights frozen but BatchNorm's γ, β adapting. The reference
    # code keeps BatchNorm out of the inner loop; maml.py adapts it (it stands in for conv biases).
    body = patterns[f"1-{len(layers)}"]
    weights = [k for k in body if not k.startswith("bn")]
    if len(weights) < len(body):
        patterns[f"1-{len(layers)} w"] = weights
    table = {}
    for name, frozen in patterns.items():
        curve = maml.evaluate(params, problem, "test", cfg.test_tasks, cfg.seed + 2, cfg,
                              partial(adapt_unfrozen, frozen=frozen))
        table[name] = mean_ci(curve[-1])
    print(f"\nFreezing (§2, Table 2): {problem.metric_name} ± 95% CI over {cfg.test_tasks} test tasks, "
          f"{cfg.ways}-way {cfg.shots}-shot, {cfg.eval_steps} inner steps, α = {cfg.inner_lr}; frozen layers "
          f"get no inner-loop update, the head always adapts")
    print(f"{'frozen':<8} {'ours':>17}   paper MiniImageNet 5w1s / 5w5s")
    for name, (m, c) in table.items():
        paper = PAPER_FREEZE.get(name, "not in the paper: conv weights frozen, BN γ, β adapt")
        print(f"{name:<8} {m:9.4f} ± {c:.4f}   {paper}")
    return table


# ---------------------------------------------------------------------------------------------
# App. D.2 / D.3: representational similarity (CCA, CKA) and weight distance before vs after
# ---------------------------------------------------------------------------------------------

def _orthonormal_basis(x, rtol=1e-6):
    """An orthonormal basis (n, r) of the column space of the centred x (n, d), rank r: the
    whitening step of CCA, done with an SVD so that dead (constant) ReLU units do no harm."""
    x = x - x.mean(0, keepdim=True)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    return u[:, s > rtol * s.max()]


def cca(x, y):
    """Mean canonical correlation (Raghu et al. 2017, [20]) of x (n, d1) and y (n, d2), n data
    points. The canonical correlations are the cosines of the principal angles between the two
    centred column spaces: the singular values of Qx^T Qy. Invariant to any invertible linear
    map of either side; 1 for identical representations, nan (no correlations) if either is constant."""
    qx, qy = _orthonormal_basis(x.double()), _orthonormal_basis(y.double())
    rho = torch.linalg.svdvals(qx.T @ qy)
    return float(rho.clamp(0, 1).mean())


def linear_cka(x, y):
    """Linear CKA (Kornblith et al. 2019, [14]): ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F),
    with Xc, Yc centred. Invariant to orthogonal maps and isotropic scaling; in [0, 1]; nan (0/0)
    if either is constant."""
    x, y = x.double(), y.double()
    x, y = x - x.mean(0, keepdim=True), y - y.mean(0, keepdim=True)
    den = torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y)
    return float(torch.linalg.norm(y.T @ x) ** 2 / den)


def unit_matrix(a):
    """One task's activations (B, C[, H, W]) -> (B*H*W, C): each spatial position of each image is
    a data point and each channel a neuron, the usual treatment of conv layers in SVCCA."""
    return a.movedim(1, -1).reshape(-1, a.shape[1]) if a.dim() == 4 else a


def similarity(cfg, problem, net, params, splits):
    """For each test task: θ' = MAML's full inner loop (eval_steps steps of α); each layer's
    activations on the task's query images under θ and under θ'; their CCA and CKA; and the
    distance ||θ'_l − θ_l||. Averaged over tasks."""
    query = cfg.similarity_query if splits else cfg.query
    if splits:
        sample = data.EpisodeSampler(splits["test"], cfg.ways, cfg.shots, query, cfg.device, "test",
                                     cfg.rotate_tasks).sample
    else:
        sample = partial(problem.sample, "test")
    g = torch.Generator().manual_seed(cfg.seed + 2)
    layers = body_layers(params, net)
    groups = {name: layers[i] for name, i in zip(net.layer_names, layers)} | {"head": list(net.head_keys)}
    scores = {m: {name: [] for name in net.layer_names} for m in ("cca", "cka", "distance")}
    # at most about 2000 probe images at once: conv1's activations of 20-way tasks are large
    chunk = min(cfg.eval_chunk, max(1, 2000 // (cfg.ways * query)))
    for done in range(0, cfg.similarity_tasks, chunk):
        n = min(chunk, cfg.similarity_tasks - done)
        x_s, y_s, x_q, _ = sample(n, g)
        theta = {k: v.detach().requires_grad_() for k, v in per_task(params, n).items()}
        fast = maml.adapt(theta, problem.forward, problem.loss, x_s, y_s, cfg.eval_steps, cfg.inner_lr, True)
        with torch.no_grad():
            before, after = net.layer_outputs(theta, x_q), net.layer_outputs(fast, x_q)
            for name, a, b in zip(net.layer_names, before, after):
                for t in range(n):
                    scores["cca"][name].append(cca(unit_matrix(a[t]), unit_matrix(b[t])))
                    scores["cka"][name].append(linear_cka(unit_matrix(a[t]), unit_matrix(b[t])))
                diff = torch.cat([(fast[k] - theta[k]).reshape(n, -1) for k in groups[name]], 1)
                scores["distance"][name].extend(torch.linalg.norm(diff, dim=1).tolist())
    summary = {m: {name: mean_ci(v) for name, v in by_layer.items()} for m, by_layer in scores.items()}
    print(f"\nRepresentational similarity before vs after the inner loop (App. D.2-D.3, Fig. 4/5): "
          f"{cfg.similarity_tasks} test tasks, {cfg.eval_steps} steps of α = {cfg.inner_lr} on every layer, "
          f"activations on {cfg.ways}x{query} query images")
    print(f"{'layer':<7} {'CCA':>17} {'CKA':>17} {'||θ′−θ||':>17}")
    for name in net.layer_names:
        print(f"{name:<7} " + " ".join(f"{summary[m][name][0]:8.4f} ± {summary[m][name][1]:.4f}"
                                       for m in ("cca", "cka", "distance")))
    print("paper (MiniImageNet 5w5s, Fig. 4): CCA and CKA about 1 for conv1-2, above 0.9 for conv3-4, "
          "under 0.5 (CCA) for the head")
    return summary


# ---------------------------------------------------------------------------------------------
# App. E.6, Table 4: computation time on the MiniImageNet network
# ---------------------------------------------------------------------------------------------

def _time(fn, batches, device):
    """ms per call of fn over `batches` calls, after one warm-up call (allocator, kernels)."""
    times = []
    for _ in range(batches + 1):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()                 # CUDA kernels run asynchronously: wait for them
        times.append(time.perf_counter() - start)
    return np.array(times[1:]) * 1000.0


def timing(cfg, image_size=84):
    """Training: forward and backward of one meta-step (5 inner steps, α = 0.01, task batch 1,
    one target example). Inference: 10 inner steps and the target's prediction. The MiniImageNet
    network of MAML §5.2 on random 84x84 images, so no data loading is timed (as in App. E.6)."""
    device = torch.device(cfg.device)
    g = torch.Generator().manual_seed(cfg.seed)
    ways, out = 5, {}
    params = {k: v.to(device).requires_grad_()
              for k, v in maml.init_convnet(3, 32, ways, maml.conv_feature_dim(image_size, 32, True), g).items()}
    problem = data.Problem(params, None, maml.cross_entropy_per_task, maml.accuracy_per_task, "acc", None)
    problem.forward = make_net(SimpleNamespace(dataset="miniimagenet"), problem)
    inner_loop = {"MAML": maml.adapt, "FOMAML": maml.adapt, "ANIL": adapt}
    print(f"\nTiming (App. E.6, Table 4): MiniImageNet network, 5-way, task batch 1, 1 target example, "
          f"mean of {cfg.timing_batches} batches, device {cfg.device}, {torch.get_num_threads()} thread(s)")
    for shots in (1, 5):
        x_s = torch.rand(1, ways * shots, 3, image_size, image_size, generator=g).to(device)
        y_s = torch.arange(ways).repeat_interleave(shots).unsqueeze(0).to(device)
        x_q = torch.rand(1, 1, 3, image_size, image_size, generator=g).to(device)
        y_q = torch.zeros(1, 1, dtype=torch.long, device=device)

        def train(algorithm):
            c = SimpleNamespace(inner_steps=5, inner_lr=0.01, first_order=algorithm == "FOMAML")
            maml.meta_loss(params, problem, (x_s, y_s, x_q, y_q), c, inner_loop[algorithm])[0].backward()

        def infer(algorithm):
            fast = {k: v.detach().requires_grad_() for k, v in per_task(params, 1).items()}
            fast = inner_loop[algorithm](fast, problem.forward, problem.loss, x_s, y_s, 10, 0.01, first_order=True)
            with torch.no_grad():
                problem.forward(fast, x_q).argmax(-1)
        for phase, step, algorithms in (("train", train, ("MAML", "FOMAML", "ANIL")),
                                        ("inference", infer, ("MAML", "ANIL"))):
            ms = {a: _time(partial(step, a), cfg.timing_batches, device) for a in algorithms}
            paper = PAPER_TIMING[(phase, shots)]
            print(f"{phase} 5-way {shots}-shot:  {'mean ms':>9} {'median ms':>10} {'speed-up':>9}   "
                  f"paper: mean s, speed-up")
            for a in algorithms:
                mean, median, speedup = ms[a].mean(), np.median(ms[a]), ms["MAML"].mean() / ms[a].mean()
                print(f"  {a:<8} {mean:18.1f} {median:10.1f} {speedup:8.2f}x   "
                      f"{paper[a]:.3f} s, {paper['MAML'] / paper[a]:.2f}x")
                out[f"{phase}_{shots}shot_{a}"] = {"mean_ms": float(mean), "median_ms": float(median),
                                                   "speedup": float(speedup)}
    return out


# ---- Below: what the paper does not contain: command line, checkpoints, plots (training is maml.train) ----

# The flags that exist only here: like data.SESSION_FLAGS, always taken from the command line.
ANALYSIS_FLAGS = {"freeze_table", "similarity", "similarity_tasks", "similarity_query", "timing",
                  "timing_batches"}
def build_parser():
    p = maml.build_parser()
    p.description = ("ANIL (Raghu et al. 2020): MAML whose inner loop adapts only the head, plus the "
                     "paper's freezing, representational-similarity and timing analyses. Flags left unset "
                     "take MAML's paper values for the chosen dataset (App. C), except ANIL's own MiniImageNet "
                     "length and meta-batch: 30000 iterations, 4 tasks (App. E.5).")
    a = p.add_argument
    a("--freeze-table", action="store_true", help="§2 / App. D.1, Table 2: test accuracy when layers none, 1, 1-2, "
      "1-3, 1-4 get no inner-loop update at test time (the rest, head included, adapt as in MAML)")
    a("--similarity", action="store_true", help="App. D.2-D.3, Fig. 4/5: per-layer CCA, linear CKA and weight "
      "distance before vs after MAML's full inner loop, averaged over test tasks")
    a("--similarity-tasks", type=int, default=100, help="test tasks averaged in --similarity")
    a("--similarity-query", type=int, default=15, help="query images per class on which --similarity compares "
      "activations (CCA needs many more data points than neurons; paper: not stated)")
    a("--timing", action="store_true", help="App. E.6, Table 4: ms per training step and per inference of MAML, "
      "FOMAML and ANIL on the MiniImageNet network (random tensors, no data needed), then exit")
    a("--timing-batches", type=int, default=30, help="timed batches per entry of --timing (paper: 2000)")
    return p


def parse(parser, argv, analysis_flags=ANALYSIS_FLAGS):
    """data.parse_args, with the analysis flags taken from the command line (they are not part of
    training), then the paper settings. ANIL resumes its own training; a MAML model may be tested
    (the freezing study's "1-4")."""
    cfg, saved, _ = data.parse_args(parser, argv, "anil", testable={"maml"},
                                    session_flags=data.SESSION_FLAGS | analysis_flags)
    if cfg.plot and not getattr(cfg, "similarity", True):           # nil.py has no --similarity
        raise SystemExit("error: anil.py's --plot draws the --similarity bars; add --similarity")
    if cfg.dataset in ("miniimagenet", "folder"):
        for k, v in MINIIMAGENET_SETTINGS.items():
            if getattr(cfg, k) is None:
                setattr(cfg, k, v)
    return maml.finalize_config(cfg), saved


# App. E.5: ANIL's own MiniImageNet runs, 30,000 iterations with meta-batch 4 (MAML A.1: 60,000, and
# meta-batch 2 for 5-shot); the rest as MAML's. On Omniglot, anil.py keeps MAML's A.1 settings so that
# the two are compared at one setting (README: differences).
MINIIMAGENET_SETTINGS = dict(iterations=30000, meta_batch_size=4)


def setup(cfg, saved):
    """maml.setup, with the network split into body and head for ANIL's inner loop."""
    problem, state = maml.setup(cfg, saved)
    net = make_net(cfg, problem)
    problem.forward = net          # the same network, split into body and head
    return problem, net, state


def plot_similarity(path, summary, cfg):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    titles = {"cca": "CCA similarity", "cka": "CKA similarity", "distance": "weight distance ||θ′−θ||"}
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
    for ax, (m, title) in zip(axes, titles.items()):
        names = list(summary[m])
        ax.bar(names, [summary[m][n][0] for n in names], yerr=[summary[m][n][1] for n in names],
               color=["tab:blue"] * (len(names) - 1) + ["tab:red"], capsize=3)
        ax.set_title(title, fontsize=10)
        if m != "distance":
            ax.set_ylim(0, 1.05)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"before vs after the MAML inner loop, {cfg.dataset} {cfg.ways}-way {cfg.shots}-shot "
                 f"({cfg.similarity_tasks} test tasks)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"saved {path}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    data.keep_freed_memory()
    if any(a == "--env" or a.startswith("--env=") for a in argv):
        import rl     # only here: the supervised runs need no gymnasium
        return rl.main(argv, adapt_policy, "anil", "anil.py")
    cfg, saved = parse(build_parser(), argv)
    if cfg.timing:
        print("config: " + " ".join(f"{k}={v}" for k, v in vars(cfg).items()))
        data.seed_everything(cfg.seed)
        return data.write_results(cfg.out, {"config": vars(cfg), "timing": timing(cfg)})
    data.setup_distributed(cfg, "anil.py")
    problem, net, state = setup(cfg, saved)
    if saved and saved.get("algorithm", "maml") != "anil":
        print(f"note: {cfg.load} was trained by maml.py; its test below uses ANIL's head-only inner loop "
              f"(the 'frozen 1-4' row of the freezing table)")
    if cfg.predict:
        params = {k: v.to(cfg.device) for k, v in state["params"].items()}
        return data.run_predict(cfg, partial(maml.classify, params, problem, cfg, inner_loop=adapt))

    started = time.time()
    if not cfg.eval_only:
        state = maml.train(cfg, problem, state, adapt, "anil")
    if data.RANK != 0:       # torchrun: rank 0 alone tests and writes
        return None
    results = {"config": vars(cfg), "train_seconds": round(time.time() - started, 1),
               "iteration": state["iteration"], "history": state.get("history", [])}
    params = {k: v.to(cfg.device) for k, v in state["params"].items()}

    curve = evaluate(params, problem, "test", cfg.test_tasks, cfg.seed + 2, cfg)
    name = problem.metric_name
    task = (f"K = {cfg.shots} points" if cfg.dataset == "sinusoid"
            else f"{cfg.ways}-way {cfg.shots}-shot, {cfg.bn_mode} BatchNorm")
    print(f"\nANIL meta-test: {cfg.test_tasks} tasks, {task}, {name} ± 95% CI after k head steps "
          f"(α = {cfg.inner_lr}):")
    print("  " + data.format_curve(curve))
    m, c = mean_ci(curve[-1])
    print(f"test_{name}={m:.4f} ci95={c:.4f} steps={cfg.eval_steps}")
    results["test"] = {f"{name}_by_step": [mean_ci(r) for r in curve], name: m, "ci95": c}
    if cfg.freeze_table:
        results["freeze_table"] = freeze_table(cfg, problem, net, params)
    if cfg.similarity:
        results["similarity"] = similarity(cfg, problem, net, params, problem.splits)
    data.write_results(cfg.out, results)
    if cfg.plot and cfg.similarity:
        plot_similarity("anil_similarity.png" if cfg.plot == "auto" else cfg.plot, results["similarity"], cfg)
    return results


if __name__ == "__main__":
    data.run(main)
