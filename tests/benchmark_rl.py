"""Benchmark of rl.py (not collected by pytest: its name does not start with test_).

Prints, for each environment, the raw step rate of the vector environment (random actions, no
policy) and the step rate of rl.sample() with the Gaussian policy in the loop (issue target: at
least 80% of the raw rate) and the rate of the policy's forward pass alone, which bounds that
ratio; then the seconds per meta-iteration of MAML, first-order MAML and ANIL (sampling D_i and
D'_i, the inner step, TRPO) at the paper's meta-batch, and the peak resident memory. glibc's
malloc is set as the scripts set it (data.keep_freed_memory()) unless --malloc-default.

    python tests/benchmark_rl.py                      # about 10 minutes on 2 CPU cores
    python tests/benchmark_rl.py --envs navigation2d --iterations 5

Set OMP_NUM_THREADS to fix the number of threads; the figures are printed with it.
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import anil
import data
import maml
import rl


def raw_steps_per_s(name, num_envs, horizon, rounds):
    envs = rl.make_vector_env(name, num_envs, horizon)
    envs.set_attr("task", rl.task_family(name).sample_tasks(num_envs, np.random.default_rng(0)))
    rng = np.random.default_rng(0)
    act_dim = envs.single_action_space.shape[0]
    actions = [rng.normal(size=(num_envs, act_dim)).astype(np.float32) for _ in range(horizon)]
    envs.reset(seed=list(range(num_envs)))
    start = time.perf_counter()
    for _ in range(rounds):
        envs.reset(seed=list(range(num_envs)))
        for a in actions:
            envs.step(a)
    seconds = time.perf_counter() - start
    envs.close()
    return rounds * horizon * num_envs / seconds


def sampling_steps_per_s(name, num_envs, episodes, horizon, rounds):
    envs = rl.make_vector_env(name, num_envs, horizon)
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    tasks = rl.task_family(name).sample_tasks(num_envs // episodes * rounds, np.random.default_rng(0))
    params = maml.per_task(rl.init_policy(obs_dim, act_dim, torch.Generator().manual_seed(0)), len(tasks))
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    ep = rl.sample(envs, params, tasks, episodes, horizon, g)
    seconds = time.perf_counter() - start
    envs.close()
    # a round steps all its environments until the last episode ends: count those steps
    per_round = num_envs // episodes
    steps = sum(num_envs * int((ep.mask[r * per_round:(r + 1) * per_round].sum((0, 1)) > 0).sum())
                for r in range(rounds))
    return steps / seconds, float(ep.mask.mean())


def policy_steps_per_s(name, num_envs, episodes, horizon, rounds):
    """The policy's forward pass alone, on as many observations as the vector env returns per
    step: no sampling can be faster than 1 / (1 / raw + 1 / this)."""
    envs = rl.make_vector_env(name, 1, horizon)
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    envs.close()
    params = maml.per_task(rl.init_policy(obs_dim, act_dim, torch.Generator().manual_seed(0)), num_envs // episodes)
    obs = torch.randn(num_envs // episodes, episodes, obs_dim, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(rounds * horizon):
            rl.policy_forward(params, obs)
    return rounds * horizon * num_envs / (time.perf_counter() - start)


def meta_iteration_seconds(name, algorithm, iterations, meta_batch, episodes, first_order=False):
    cfg = SimpleNamespace(**vars(rl.build_parser("bench", algorithm).parse_args(["--env", name])))
    cfg.meta_batch_size, cfg.episodes, cfg.first_order = meta_batch, episodes, first_order
    cfg = rl.finalize_config(cfg)
    envs = rl.make_vector_env(name, cfg.num_envs, cfg.horizon)
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    params = {k: v.requires_grad_() for k, v in rl.init_policy(obs_dim, act_dim, torch.Generator().manual_seed(0)).items()}
    inner = maml.adapt_policy if algorithm == "maml" else anil.adapt_policy
    rng, g = np.random.default_rng(0), torch.Generator().manual_seed(0)
    times = []
    for _ in range(iterations):
        tasks = rl.task_family(name).sample_tasks(meta_batch, rng)
        start = time.perf_counter()
        rl.meta_iteration(params, inner, envs, tasks, cfg, g, torch.device("cpu"))
        times.append(time.perf_counter() - start)
    envs.close()
    return float(np.median(times)), times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", nargs="+", default=["navigation2d", "halfcheetah-dir", "ant-dir"],
                   choices=sorted(rl.ENV_SETTINGS))
    p.add_argument("--num-envs", type=int, default=400, help="environments stepped together (20 tasks x 20 episodes)")
    p.add_argument("--rounds", type=int, default=2, help="episodes per environment in the step-rate figures")
    p.add_argument("--iterations", type=int, default=3, help="timed meta-iterations (the median is printed)")
    p.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-iteration (default: the paper's)")
    p.add_argument("--skip-meta", action="store_true", help="only the step rates")
    p.add_argument("--malloc-default", action="store_true",
                   help="leave glibc's malloc settings alone (rl.py calls data.keep_freed_memory())")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    kept = False if args.malloc_default else data.keep_freed_memory()
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} num_envs={args.num_envs} "
          f"keep_freed_memory={kept}")
    results = {"threads": torch.get_num_threads(), "num_envs": args.num_envs, "keep_freed_memory": kept, "envs": {}}
    for name in args.envs:
        s = rl.ENV_SETTINGS[name]
        episodes = 20
        raw = raw_steps_per_s(name, args.num_envs, s["horizon"], args.rounds)
        with_policy, alive = sampling_steps_per_s(name, args.num_envs, episodes, s["horizon"], args.rounds)
        policy = policy_steps_per_s(name, args.num_envs, episodes, s["horizon"], args.rounds)
        bound = 1 / (1 + raw / policy)
        r = {"raw_steps_per_s": raw, "sampling_steps_per_s": with_policy, "ratio": with_policy / raw,
             "policy_forward_steps_per_s": policy, "ratio_bound": bound, "valid_fraction": alive}
        print(f"{name:<16} raw vector env {raw:9.0f} steps/s   sampling with the policy {with_policy:9.0f} steps/s"
              f"   ratio {with_policy / raw:.2f} (target >= 0.80)\n{'':<16} the policy's forward pass alone "
              f"{policy:9.0f} steps/s: the ratio cannot exceed {bound:.2f}")
        if not args.skip_meta:
            for algorithm, first_order in (("maml", False), ("maml", True), ("anil", False)):
                T = args.meta_batch or s["meta_batch_size"]
                sec, all_times = meta_iteration_seconds(name, algorithm, args.iterations, T, episodes, first_order)
                label = ("fo-" if first_order else "") + algorithm
                r[f"{label}_s_per_iteration"] = sec
                r["meta_batch"] = T
                print(f"{'':<16} {label.upper():<8} {sec:7.2f} s per meta-iteration (median of "
                      f"{len(all_times)}; meta-batch {T}, K = {episodes})")
        results["envs"][name] = r
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["peak_rss_mib"] = peak
    print(f"peak resident memory {peak:.0f} MiB")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
