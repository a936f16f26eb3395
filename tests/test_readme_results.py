"""The README's ledger. Every table row that names a results/*.json is checked cell by cell: each
column header says which entry of that file the cell shows (COLUMNS below), so a number copied into
the wrong column, row or table fails, not only a number that appears nowhere."""

import json
import re

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text()
JSON = re.compile(r"results/([\w.-]+\.json)")


def signed(x, decimals):
    return f"{x:.{decimals}f}".replace("-", "−")


def pair(p, decimals=2, scale=1.0):
    """'mean ± ci' as the README prints it: U+2212 for a minus sign."""
    return f"{signed(scale * p[0], decimals)} ± {scale * p[1]:.{decimals}f}"


def pct(p):
    return pair(p, 2, 100.0)


def curve(j, row):
    """The test curve of a run (one cell per step): returns (RL), MSE or accuracy in %."""
    t = j["test"]
    if "return_by_step" in t:
        return [pair(p) for p in t["return_by_step"]]
    if "BatchNorm" in row:                                    # reptile.py: one curve per BatchNorm mode
        t = t[row["BatchNorm"].replace("-", "")]
    steps = t.get("accuracy_by_step") or t.get("acc_by_step")
    return [pct(p) for p in steps]


def sinusoid(j, row, k):
    model = "maml" if row["model"].startswith("MAML") else "pretrained"
    return pair(j["test"][f"K={row['K']}"][model][k], 3)


def model(j, row):
    """A row named after its α ("MAML, α 0.001") must come from a run at that α."""
    m = re.match(r"MAML, α ([\d.]+)", row["model"])
    return row["model"] if m is None or float(m.group(1)) == j["config"]["inner_lr"] else \
        f"a run at α {j['config']['inner_lr']:g}"


def nil_entry(key):
    """A nil.py entry: {'accuracy', 'ci95'} or a paired difference {'mean', 'ci95'}, in %."""
    def cell(j, row):
        e = j["test"][key]
        return pct((e.get("accuracy", e.get("mean")), e["ci95"]))
    return cell


def timing(algorithm, field, decimals):
    def cell(j, row):
        entry = j["timing"]["{}_{}shot_{}".format(row["phase"], row["shots"], algorithm)]
        return f"{entry[field]:.{decimals}f}"
    return cell


def benchmark(peer, threads="1thread"):
    """tests/benchmark.py's cell: ours ÷ the peer, MAML second / first order · ANIL second / first."""
    def cell(j, row):
        j = json.loads((ROOT / "results" / f"benchmark_cpu_{threads}.json").read_text()) if threads != "1thread" else j
        by = {(c["algo"], c["order"]): c for c in j["cells"] if c["setting"] == row["setting"][0]}
        return " · ".join(" / ".join(f"{by[a, o]['ratio'][peer]:.2f}" for o in ("second", "first"))
                          for a in ("maml", "anil"))
    return cell


def memory(j, row):
    c = next(c for c in j["cells"] if c["setting"] == row["setting"][0] and c["algo"] == "maml" and c["order"] == "second")
    return " / ".join(f"{c['mem_mib'][p]:.0f}" for p in ("ours", "ref", "higher"))


def distributed(field, fmt):
    def cell(j, row):
        return fmt.format(next(r for r in j["rows"] if r["setting"] == row["setting"])[field])
    return cell


def steps_slash(stats):
    return " / ".join(signed(m, 2) for m, _ in stats)


def over_seeds(j, row):
    """The mean over the row's runs (one JSON per seed) of each step's mean return, with half the range
    of the seeds' means: 'm (± h)' per step, joined by ' / '."""
    runs = [json.loads((ROOT / "results" / name).read_text())
            for name in dict.fromkeys(JSON.findall(" ".join(row.values())))]
    means = [[m for m, _ in r["test"]["return_by_step"]] for r in runs]
    return " / ".join(f"{signed(sum(c) / len(c), 2)} (± {(max(c) - min(c)) / 2:.2f})" for c in zip(*means))


def stored(j, row):
    """The authors' stored results (results/authors_stored_results.json, from cbfinn/maml_rl's pickles)."""
    theirs = json.loads((ROOT / "results" / "authors_stored_results.json").read_text())["return_by_step"]
    return steps_slash(theirs[f"{j['config']['env']}/{row['policy'].lower()}"][:4])          # their point runs tested 4 steps


def log_std(j, row):
    return " / ".join(f"{v:.2f}".replace("-", "−") for v in j["test"]["log_std_by_step"])


# Column header -> the cell's expected text, from the row's JSON and the row's other cells.
COLUMNS = {
    # test curves: MAML Table 1, ANIL, Reptile, navigation and HalfCheetah
    "0 steps": lambda j, r: curve(j, r)[0], "1 step": lambda j, r: curve(j, r)[1],
    "2 steps": lambda j, r: curve(j, r)[2], "3 steps": lambda j, r: curve(j, r)[3],
    "before adapting": lambda j, r: curve(j, r)[0],
    "after the test steps": lambda j, r: curve(j, r)[-1],
    # MAML Table 2: MSE of each K and model after k steps
    "k = 0": lambda j, r: sinusoid(j, r, 0), "k = 1": lambda j, r: sinusoid(j, r, 1),
    "k = 5": lambda j, r: sinusoid(j, r, 5), "k = 10": lambda j, r: sinusoid(j, r, 10),
    # ... and why more steps looked worse at α = 0.01: maml.print_diagnosis()
    "model": model,
    "k = 10 without the worse tasks": lambda j, r: f"{j['diagnosis']['mean_without_worse'][1]:.3f}",
    "tasks with αλ > 2 at θ′₁ (of 600)": lambda j, r: str(j["diagnosis"]["edge_tasks"]),
    "tasks ≥ 2× worse after 10 steps than after 1": lambda j, r: str(j["diagnosis"]["worse_tasks"]),
    # Reptile Fig. 1: the sinusoid, one curve per model
    "MSE before adapting": lambda j, r: pair(j["test"][r["model"]]["mse_by_step"][0], 3),
    "MSE after 32 steps": lambda j, r: pair(j["test"][r["model"]]["mse_by_step"][-1], 3),
    # ANIL Tables 1 and 3, NIL: one nil.py run tests all three models on the same tasks
    "ANIL": nil_entry("anil_head"), "MAML": nil_entry("maml_head"), "NIL": nil_entry("nil"),
    "ANIL − MAML, paired": nil_entry("anil_minus_maml"), "NIL − ANIL, paired": nil_entry("nil_minus_head"),
    # ANIL Table 2, Fig. 4-5, NIL Table 5
    "frozen at test": lambda j, r: pct(j["freeze_table"][r["layers"]]),
    "CCA": lambda j, r: pair(j["similarity"]["cca"][r["layer"]], 3),
    "CKA": lambda j, r: pair(j["similarity"]["cka"][r["layer"]], 3),
    "‖θ′ − θ‖": lambda j, r: pair(j["similarity"]["distance"][r["layer"]], 3),
    "accuracy": lambda j, r: pct(j["head_body"][f"{r['body']} / {r['head']}"]),
    # ANIL Table 4
    "MAML ms": timing("MAML", "mean_ms", 1), "ANIL ms": timing("ANIL", "mean_ms", 1),
    "FOMAML ms": timing("FOMAML", "mean_ms", 1),
    "ANIL speed-up": lambda j, r: f"{timing('ANIL', 'speedup', 2)(j, r)}×",
    # Speed, side by side (tests/benchmark.py) and torchrun (tests/benchmark_distributed.py)
    "÷ loop": benchmark("ref"), "÷ loop, 2 threads": benchmark("ref", "2threads"), "÷ higher": benchmark("higher"),
    "memory rise MiB, ours / loop / higher": memory,
    "1 process × 2 threads, ms": distributed("single_ms", "{:.0f}"),
    "2 processes × 1 thread, ms": distributed("multi_ms", "{:.0f}"), "speed-up": distributed("speedup", "{:.2f}×"),
    # meta-RL over seeds, the authors' stored results, and the step-3 experiments
    "ours, mean of 3 seeds (± half their range): 0 / 1 / 2 / 3 steps": over_seeds,
    "the authors' stored (cbfinn/maml_rl): 0 / 1 / 2 / 3 steps": stored,
    "seed": lambda j, r: str(j["config"]["seed"]),
    "mean log σ at steps 0 / 1 / 2 / 3": log_std,
    "mean episode length at steps 0 / 1 / 2 / 3":
        lambda j, r: " / ".join(f"{v:.1f}" for v in j["test"]["episode_length_by_step"]),
    "iterations trained": lambda j, r: str(j["iteration"] or "none"),
    "step sizes at test": lambda j, r: " / ".join(f"{a:g}" for a in j["config"].get("test_lrs") or
                                                  [j["config"]["inner_lr"]] + [j["config"]["inner_lr"] / 2] * 2),
    "trajectories per step": lambda j, r: str(j["config"]["eval_episodes"]),
    "best iteration tested": lambda j, r: str(j["best_iteration"]),
    # the α measurement: the step the run used
    "α here": lambda j, r: f"{j['config']['inner_lr']:g}",
}


def tables():
    """Every table of the README whose rows name a results JSON: (header, rows as dicts)."""
    found, lines = [], README.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"\|[-| ]+\|$", lines[i + 1]):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            for body in lines[i + 2:]:
                if not body.startswith("|"):
                    break
                rows.append(dict(zip(header, (c.strip() for c in body.strip("|").split("|")))))
            if any(JSON.search(v) for r in rows for v in r.values()):
                found.append((header, rows))
    return found


def test_the_readme_has_results_tables():
    assert len(tables()) >= 10, "the README's results tables name no results/*.json"


@pytest.mark.parametrize("header,rows", tables(), ids=lambda x: x[0] if isinstance(x[0], str) else "")
def test_every_cell_is_the_entry_its_column_names(header, rows):
    mapped = [h for h in header if h in COLUMNS]
    assert mapped, f"the table with columns {header} has no column that names a results entry (COLUMNS)"
    for row in rows:
        link = next((JSON.search(v) for v in row.values() if JSON.search(v)), None)
        assert link, f"a row of the table {header} names no results JSON: {row}"
        path = ROOT / "results" / link.group(1)
        assert path.exists(), f"{link.group(1)} is named in the README but not in results/"
        j = json.loads(path.read_text())
        for h in mapped:
            if row[h] in ("", "—", "not run"):
                continue
            expected = COLUMNS[h](j, row)
            assert row[h] == expected, f"{link.group(1)}, column '{h}': the README shows {row[h]}, the file {expected}"


def test_a_swapped_cell_fails():
    """The control: the check above must catch two cells of one row exchanged."""
    header, rows = next((h, r) for h, r in tables() if "1 step" in h and "2 steps" in h)
    row = dict(rows[0])
    row["1 step"], row["2 steps"] = row["2 steps"], row["1 step"]
    j = json.loads((ROOT / "results" / JSON.search(" ".join(row.values())).group(1)).read_text())
    assert row["1 step"] != COLUMNS["1 step"](j, row)


def github_anchor(heading):
    """GitHub's id for a heading: lower case, punctuation dropped (letters such as α kept), spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_within_the_readme_reaches_a_heading():
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", README, re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", README)
    assert links, "the README links none of its own sections"
    assert not [a for a in links if a not in anchors], f"links to no heading; headings: {sorted(anchors)}"
    assert github_anchor("The α convention, decided by measurement") == "the-α-convention-decided-by-measurement"
