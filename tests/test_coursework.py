"""Coursework copies: an algorithm file and the files it names (README: reading guide) run on their
own, in a folder with nothing else, where gymnasium, MuJoCo and matplotlib cannot be imported."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Each script and what it needs besides itself (the README's reading guide says the same).
NEEDS = {"maml.py": ["data.py"], "anil.py": ["maml.py", "data.py"], "nil.py": ["anil.py", "maml.py", "data.py"],
         "reptile.py": ["maml.py", "data.py"]}

# Importing any of these raises ImportError, as on a machine where they were never installed.
BLOCK = "import sys\nfor m in ('gymnasium', 'mujoco', 'matplotlib', 'pytest'):\n    sys.modules[m] = None\n"


def run_copy(script, argv, folder):
    for f in [script, *NEEDS[script]]:
        shutil.copy(ROOT / f, folder / f)
    code = BLOCK + f"import runpy\nsys.argv = {[script, *argv]!r}\nrunpy.run_path({script!r}, run_name='__main__')\n"
    return subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=300)


def test_the_block_works(tmp_path):
    """The control: with the block, importing gymnasium fails, so rl.py cannot be what the runs use."""
    r = subprocess.run([sys.executable, "-c", BLOCK + "import gymnasium"], capture_output=True, text=True)
    assert r.returncode != 0 and "import of gymnasium halted" in r.stderr


@pytest.mark.parametrize("script", sorted(NEEDS))
def test_a_copied_script_runs_without_gymnasium(script, omniglot_dir, tmp_path):
    folder = tmp_path / "coursework"
    folder.mkdir()
    tiny = ["--iterations", "2", "--meta-batch-size", "2", "--val-tasks", "2", "--test-tasks", "2",
            "--eval-steps", "1"]
    if script == "reptile.py":                  # the fixture has 4 drawings per character
        tiny += ["--train-shots", "2", "--inner-steps", "2", "--inner-batch", "2", "--eval-inner-batch", "2"]
    datasets = [["--dataset", "omniglot", "--data-dir", str(omniglot_dir), "--ways", "3"]]
    if script != "nil.py":                      # NIL is a classifier: no sinusoid
        datasets.append(["--dataset", "sinusoid"])
    for i, dataset in enumerate(datasets):
        out = tmp_path / f"r{i}.json"
        r = run_copy(script, dataset + tiny + ["--out", str(out)], folder)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(out.read_text())["test"], r.stdout[-1000:]
    assert not (folder / "rl.py").exists()
    r = run_copy(script, ["--env", "navigation2d"], folder) if script in ("maml.py", "anil.py") else None
    if r is not None:      # meta-RL is the one part that needs rl.py (and gymnasium): a clear failure
        assert r.returncode != 0 and "No module named 'rl'" in r.stderr
