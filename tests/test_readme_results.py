"""Every results row of the README names the --out JSON of the run behind it, under results/,
and the numbers in the row are that file's numbers (mean ± 95% CI, as printed)."""

import json
import re

from conftest import ROOT

PAIR = re.compile(r"([−-]?\d+\.\d+) ± (\d+\.\d+)")


def pairs_in(obj):
    """Every [mean, ci] pair anywhere in a results file."""
    if isinstance(obj, dict):
        return [p for v in obj.values() for p in pairs_in(v)]
    if isinstance(obj, list):
        if len(obj) == 2 and all(isinstance(v, (int, float)) for v in obj):
            return [tuple(obj)]
        return [p for v in obj for p in pairs_in(v)]
    return []


def result_rows():
    return [line for line in (ROOT / "README.md").read_text().splitlines()
            if line.startswith("|") and re.search(r"results/[\w.-]+\.json", line)]


def test_readme_has_results_rows():
    assert result_rows(), "the README's results tables name no results/*.json"


def test_every_results_row_matches_its_json():
    for row in result_rows():
        name = re.search(r"results/([\w.-]+\.json)", row).group(1)
        path = ROOT / "results" / name
        assert path.exists(), f"{name} is named in the README but not in results/"
        known = pairs_in(json.loads(path.read_text())["test"])
        shown = [(m.replace("−", "-"), c) for m, c in PAIR.findall(row)]
        assert shown, f"the row of {name} shows no 'mean ± ci' numbers"
        for m, c in shown:
            decimals = len(m.split(".")[1])
            assert any(f"{km:.{decimals}f}" == m and f"{kc:.{decimals}f}" == c for km, kc in known), \
                f"{m} ± {c} in the README row of {name} is not in that file"
