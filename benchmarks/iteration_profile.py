r"""Time per phase of an RL iteration (rollout, scoring, update) and tokens/s.

    python benchmarks/iteration_profile.py [--iterations 6] [--smollm2_dir assets/smollm2-135m]
        [--quick]

Runs the real training loop (trustrl.training.loop.train) for a few iterations of
  (1) the embedded default (configs/default.py: 4 layers, d=128, 32 prompts x 8 samples,
      8 new tokens, bf16 rollout / fp32 trainer), warm start skipped (it does not change timing);
  (2) SmolLM2-135M-Instruct (when --smollm2_dir holds it: `python -m trustrl.tools.get_smollm2
      DIR`) on the synthetic addition task with its own tokenizer, 8 prompts x 4 samples,
      32 new tokens;
and prints the median over iterations 2.. (iteration 1 includes compilation) of each phase,
its share of the iteration, and generated response tokens per second of the whole iteration.

Runs on whatever devices jax sees (by default 1 CPU device, like `make demo`; set XLA_FLAGS=
--xla_force_host_platform_device_count=8 to profile the 8-way simulated mesh instead).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from trustrl.training import loop as train  # noqa: E402
from trustrl.infra.metrics import read_jsonl  # noqa: E402

PHASES = ("time/rollout_s", "time/score_s", "time/update_s", "time/iteration_s")


def default_config(iterations: int, quick: bool):
    c = default.get_config()
    c.warmstart.steps = 0
    c.train.iterations = iterations
    c.eval.every = 0
    c.checkpoint.every = 0
    c.log.progress = False
    c.log.tensorboard = False
    if quick:
        c.rollout.prompts_per_iter = 8
        c.task.num_train = 512
        c.task.num_test = 16
    return c


def smollm2_config(path: str, iterations: int, quick: bool):
    c = default_config(iterations, quick)
    c.model.hf_dir = path
    c.tokenizer.path = path
    c.rollout.prompts_per_iter = 4 if quick else 8
    c.rollout.group_size = 4
    c.rollout.max_new_tokens = 8 if quick else 32
    c.rollout.record_topk = 20
    c.train.minibatches = 4
    c.optim.learning_rate = 1e-6
    return c


def profile(name: str, cfg) -> dict:
    with tempfile.TemporaryDirectory() as wd:
        train.train(cfg, wd)
        rows = read_jsonl(os.path.join(wd, "metrics.jsonl"))
    steady = rows[1:] if len(rows) > 1 else rows
    out = {"name": name, "iterations": len(steady)}
    for k in PHASES:
        out[k] = float(np.median([r[k] for r in steady]))
    out["tokens"] = float(np.median([r["response/length_mean"] for r in steady])) * \
        cfg.rollout.prompts_per_iter * cfg.rollout.group_size
    out["tokens_per_s"] = out["tokens"] / out["time/iteration_s"]
    return out


def print_table(results):
    head = (f"| {'config':<22} | {'rollout s':>9} | {'score s':>8} | {'update s':>8} | "
            f"{'iter s':>7} | {'rollout %':>9} | {'update %':>8} | {'resp tok/iter':>13} | "
            f"{'tok/s':>7} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in results:
        it = r["time/iteration_s"]
        print(f"| {r['name']:<22} | {r['time/rollout_s']:9.3f} | {r['time/score_s']:8.3f} | "
              f"{r['time/update_s']:8.3f} | {it:7.3f} | {100 * r['time/rollout_s'] / it:8.1f}% | "
              f"{100 * r['time/update_s'] / it:7.1f}% | {r['tokens']:13.0f} | "
              f"{r['tokens_per_s']:7.0f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--smollm2_dir", default="assets/smollm2-135m")
    p.add_argument("--quick", action="store_true", help="small batches (smoke test)")
    p.add_argument("--skip_smollm2", action="store_true")
    a = p.parse_args(argv)
    if a.iterations < 2:
        raise SystemExit("--iterations must be >= 2 (the first one includes compilation)")
    results = [profile("default (tiny model)", default_config(a.iterations, a.quick))]
    if not a.skip_smollm2:
        if os.path.exists(os.path.join(a.smollm2_dir, "config.json")):
            results.append(profile("SmolLM2-135M", smollm2_config(a.smollm2_dir, a.iterations,
                                                                   a.quick)))
        else:
            print(f"(SmolLM2 skipped: no model at {a.smollm2_dir}; "
                  f"python -m trustrl.tools.get_smollm2 {a.smollm2_dir})")
    print_table(results)
    return results


if __name__ == "__main__":
    main()
