"""A mutation check you can re-run (not collected by pytest): break the code on purpose, one change at a
time, in a scratch copy of the tracked files, run the tests, and list which tests caught each change.

    python tests/mutations.py                 # each mutation against the test files that guard it
    python tests/mutations.py --full          # each mutation against the whole suite (the README's command)
    python tests/mutations.py --only eps      # the mutations whose name contains 'eps'

A mutation that no test catches exits non-zero: it names a README claim or a property with no guard.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name, file, the exact text, its replacement, the test files that should catch it
MUTATIONS = [
    ("test steps α then α/2 -> α throughout", "rl.py",
     "[cfg.inner_lr] + [cfg.inner_lr / 2] * (steps - 1)", "[cfg.inner_lr] * steps",
     ["tests/test_rl_protocol.py"]),
    ("the best validated model -> the last iterate", "rl.py",
     'chosen = best["params"] if best and cfg.snapshot == "best" else state["params"]', 'chosen = state["params"]',
     ["tests/test_rl_protocol.py"]),
    ("torchrun's all_reduce mean × world size", "data.py",
     "t.copy_((flat[offset:offset + t.numel()] / flat[-1]).view_as(t))",
     "t.copy_((flat[offset:offset + t.numel()] / flat[-1] * WORLD).view_as(t))",
     ["tests/test_distributed.py"]),
    ("BatchNorm eps 1e-5 -> 1e-4", "maml.py",
     "def batch_norm(h, weight, bias, eps=1e-5):", "def batch_norm(h, weight, bias, eps=1e-4):",
     ["tests/test_golden.py"]),
    ("the first-order flag ignored", "maml.py",
     "grads = torch.autograd.grad(inner_loss, list(fast.values()), create_graph=not first_order)",
     "grads = torch.autograd.grad(inner_loss, list(fast.values()), create_graph=True)",
     ["tests/test_maml.py", "tests/test_reference.py"]),
    ("Reptile's outer step ε doubled", "reptile.py",
     "return cfg.meta_step_size * (1.0 - iteration / cfg.iterations)",
     "return 2 * cfg.meta_step_size * (1.0 - iteration / cfg.iterations)",
     ["tests/test_reptile.py", "tests/test_golden.py"]),
    ("a README cell swapped (MAML's 1-step and 2-step returns)", "README.md",
     "| MAML | −35.13 ± 4.58 | −13.18 ± 1.95 | −7.40 ± 1.16 |", "| MAML | −35.13 ± 4.58 | −7.40 ± 1.16 | −13.18 ± 1.95 |",
     ["tests/test_readme_results.py"]),
    ("the preset α back to the printed value", "maml.py",
     'else round(ways * s["inner_lr"], 12)', 'else s["inner_lr"]',
     ["tests/test_maml.py", "tests/test_cli.py"]),
    ("the sinusoid's α back to the printed 0.01", "maml.py",
     "SINUSOID_AUTHORS_LR = 1e-3", "SINUSOID_AUTHORS_LR = 0.01",
     ["tests/test_maml.py", "tests/test_cli.py"]),
    ("Reptile's rank means averaged unweighted (3 and 2 tasks)", "reptile.py",
     "data.all_reduce_mean(list(mean_target.values()) + state_tensors(state) + [inner], tasks)",
     "data.all_reduce_mean(list(mean_target.values()) + state_tensors(state) + [inner], 1)",
     ["tests/test_distributed.py"]),
    ("the authors' pretrained policy trained by TRPO, not Adam", "rl.py",
     "    if adam is not None:   # the authors' pretrained policy", "    if False:   # the authors' pretrained policy",
     ["tests/test_rl_protocol.py"]),
    ("the authors' HalfCheetah pretrained policy with the MAML run's KL and meta-batch", "rl.py",
     "dict(inner_lr=0.2, max_kl=0.01, meta_batch_size=5)", "dict(inner_lr=0.2)",
     ["tests/test_rl_protocol.py"]),
    ("a README cell of the step-3 table changed (α/4's test steps)", "README.md",
     "| α, then α/4 | 0.1 / 0.025 / 0.025 |", "| α, then α/4 | 0.1 / 0.05 / 0.05 |",
     ["tests/test_readme_results.py"]),
    ("a step budget that counts every episode drawn", "rl.py",
     "counted = (lengths.cumsum(1) - lengths < min_steps).to(ep.mask.dtype)", "counted = torch.ones_like(lengths)",
     ["tests/test_rl_protocol.py"]),
    ("further rounds drawn for every task, not only the short ones", "rl.py",
     "short = (steps < min_steps).nonzero().flatten().tolist()", "short = list(range(len(tasks)))",
     ["tests/test_rl_protocol.py"]),
    ("the authors' protocol trains on the padded batch, not the packed one", "rl.py",
     "return ep.mean_return().mean().item(), (pack_steps(ep) if budget else ep).to(device)",
     "return ep.mean_return().mean().item(), ep.to(device)",
     ["tests/test_rl_protocol.py"]),
    ("packing reorders the valid steps", "rl.py",
     "order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices[:, :S]",
     "order = torch.sort((~valid).to(torch.uint8), dim=1, descending=False).indices.flip(1)[:, :S]",
     ["tests/test_rl_protocol.py"]),
    ("A.2 the default everywhere, not the authors' protocol where their results are stored", "rl.py",
     'cfg.protocol = "authors" if cfg.env in AUTHORS else "a2"', 'cfg.protocol = "a2"',
     ["tests/test_rl_protocol.py"]),
    ("a checkpoint from before --protocol tested with today's default", "rl.py",
     'args.protocol = "a2"           # a checkpoint from before', 'pass  # a checkpoint from before',
     ["tests/test_rl_protocol.py"]),
    ("a NaN checkpoint accepted", "data.py",
     "bad = [k for k, v in state[\"params\"].items() if not torch.isfinite(v).all()]", "bad = []",
     ["tests/test_predict.py"]),
]


def tracked_copy(dest):
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="run the whole suite for each mutation")
    p.add_argument("--only", default=None, help="only the mutations whose name contains this")
    args = p.parse_args()
    missed = []
    for name, path, old, new, guards in MUTATIONS:
        if args.only and args.only not in name:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            scratch = Path(tmp)
            tracked_copy(scratch)
            text = (scratch / path).read_text()
            if text.count(old) != 1:
                raise SystemExit(f"mutation '{name}': the text to change occurs {text.count(old)} times in {path}; "
                                 f"update tests/mutations.py to the current code")
            (scratch / path).write_text(text.replace(old, new))
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + (["tests"] if args.full else guards)
            r = subprocess.run(command, cwd=scratch, capture_output=True, text=True, env=os.environ | {"PYTHONHASHSEED": "0"})
            caught = sorted(set(re.findall(r"^FAILED (\S+)", r.stdout, re.M)))
            print(f"{name}: " + (f"caught by {len(caught)}: " + ", ".join(caught[:6]) + (" ..." if len(caught) > 6 else "")
                                 if caught else "NOT CAUGHT"), flush=True)
            if not caught:
                missed.append(name)
    if missed:
        raise SystemExit(f"not caught: {', '.join(missed)}")


if __name__ == "__main__":
    main()
