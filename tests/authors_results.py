"""The authors' stored meta-RL test results, as the README's paper column and the dashed curves of its
figures: results/authors_stored_results.json, written from a clone of cbfinn/maml_rl.

    git clone https://github.com/cbfinn/maml_rl && python tests/authors_results.py maml_rl

and draws the README's figures of our runs over seeds beside them (dashed):

    python tests/authors_results.py figure navigation2d figures/rl_navigation2d_authors.png results/navigation2d_authors_*.json

Each icml/icml_<env>_results_<model>.pkl (a Python 2 pickle) holds {'task_avg_returns': one list per
test step, one average return per goal}, 40 goals; the test scripts (maml_examples/test_maml_*.py)
wrote them. We keep each step's mean and 95% CI over the goals (data.mean_ci), and the goals' values."""

import json
import pickle
import subprocess
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402

FILES = {"navigation2d": ("point", {"maml": "maml", "pretrained": "sens0", "random": "random", "oracle": "oracle"}),
         "halfcheetah-dir": ("cheetahdirec", {"maml": "maml", "pretrained": "pretrain", "random": "random",
                                              "oracle": "oracle"})}


def main(clone, out="results/authors_stored_results.json"):
    commit = subprocess.run(["git", "-C", clone, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = {"source": f"cbfinn/maml_rl@{commit or 'unknown'}", "files": {}, "return_by_step": {}, "per_goal": {}}
    for env, (stem, models) in FILES.items():
        for model, name in models.items():
            path = f"icml/icml_{stem}_results_{name}.pkl"
            with open(Path(clone) / path, "rb") as f:
                steps = pickle.load(f, encoding="latin1")["task_avg_returns"]
            key = f"{env}/{model}"
            results["files"][key] = path
            results["return_by_step"][key] = [data.mean_ci(goals) for goals in steps]
            results["per_goal"][key] = [[float(g) for g in goals] for goals in steps]
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    for key, stats in results["return_by_step"].items():
        print(f"{key:28s}" + "  ".join(f"{m:8.2f} ± {c:5.2f}" for m, c in stats))


def label(run):
    return run["config"].get("compare") or run["algorithm"].upper()


def a2(run):
    """A run of the paper's stated settings (--protocol a2, or from before the flag existed)."""
    return run["config"].get("protocol", "a2") == "a2"


def figure(env, out, *paths, stored="results/authors_stored_results.json", floor=-100):
    """Each of our runs solid (one line per seed, the seeds of a model in one colour), the authors'
    stored curves dashed. Returns below `floor` (a seed that failed: see the README) are drawn on the
    floor and marked with a down-pointing triangle, so that the other curves stay readable."""
    runs = {}
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        if run["config"]["env"] != env:
            raise SystemExit(f"error: {path} is not a {env} run")
        runs.setdefault((label(run), a2(run)), []).append(run)
    names = list(dict.fromkeys(n.lower() for n, _ in runs))
    names += [n for n in ("maml", "anil", "pretrained", "random", "oracle") if n not in names]
    color = {name: f"C{i}" for i, name in enumerate(names)}
    curves = []
    both = len({stated for _, stated in runs}) > 1
    for (name, stated), rs in runs.items():
        for i, r in enumerate(sorted(rs, key=lambda r: r["config"]["seed"])):
            stats = r["test"]["return_by_step"]
            below = any(m < floor for m, _ in stats)
            curves.append((f"{name}, ours" + (", A.2's settings" if stated and both else "")
                           + (f" ({len(rs)} seeds)" if len(rs) > 1 else "") if i == 0 else None,
                           range(len(stats)), [(max(m, floor), 0.0 if m < floor else c) for m, c in stats],
                           {"color": color[name.lower()], "linewidth": 1, "marker": "v" if below else "o",
                            "markersize": 4, **({"linestyle": ":"} if stated and both else {})}))
    with open(stored) as f:
        theirs = json.load(f)["return_by_step"]
    steps = len(curves[0][2])
    for key, stats in theirs.items():
        env_name, model = key.split("/")
        if env_name == env:
            stats = stats[:steps] if len(stats) > 1 else stats * steps      # the oracle: one number, never adapted
            curves.append((f"{model.upper() if model == 'maml' else model}, authors' stored", range(len(stats)), stats,
                           {"color": color[model], "linestyle": "--", "alpha": 0.8}))
    data.plot_curves(out, curves, f"{env}: ours solid" + (" (A.2's settings dotted)" if both else "")
                     + ", the authors' stored dashed",
                     "number of gradient steps", "average return per episode")


if __name__ == "__main__":
    figure(*sys.argv[2:]) if sys.argv[1] == "figure" else main(*sys.argv[1:])
