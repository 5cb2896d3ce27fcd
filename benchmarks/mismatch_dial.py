"""What the mismatch dial (trustrl.rollout.mismatch) costs, and how exact the on-policy modes are.

Run:
    python benchmarks/mismatch_dial.py            # ~1 minute on 2 CPU cores
    python benchmarks/mismatch_dial.py --quick    # tiny shapes, seconds (tests/test_benchmarks.py)

One process, one CPU device, the CPU default's model shape (benchmarks/bench_common.py), B rows
of N new tokens, best of --repeats interleaved calls after a warm-up (bench_common.best_of):

  sample, clean / noise / trap   Sampler.generate at float32 with rollout.mismatch.noise = 0 /
                                 0.05 / the pre-temperature trap (T = 0.7 for all three)
  rescore                        the trainer's score pass on the sampled batch: the extra forward
                                 of rollout.mu="rescored" (none at staleness 0 when the score pass
                                 runs anyway: the loop reuses it as pi_old)
The second table: max |log mu - log pi| on the response tokens between the float32 sampler's
recorded log-probs (KV-cache decode, one query row per step) and the trainer's float32 forward
(all positions in one pass) on the same tokens and parameters, and the same for the rescored mu.

Measured 2026-12-07 04:45 UTC on this repository's CPU VM (2 cores, jax 0.10.2; one study run
beside it, load average ~2), commit 1a5a4e4, `python benchmarks/mismatch_dial.py` (4 layers,
d=128, V=512, 64 rows x 24 new tokens, fp32, best of 3):

    | call | best ms | x clean sample |
    |---|---|---|
    | sample, clean | 116.4 | 1.00x |
    | sample, noise 0.05 | 136.6 | 1.17x |
    | sample, pre-temperature trap | 119.6 | 1.03x |
    | rescore (score pass) | 68.3 | 0.59x |
    | mu | max abs(log mu - log pi) on response tokens |
    |---|---|
    | float32 sampler (KV-cache decode) | 9.537e-07 |
    | rescored (trainer forward) | 0.000e+00 |
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.bench_common import best_of, default_shape, label  # noqa: E402
from trustrl.model import policy  # noqa: E402
from trustrl.model import transformer as M  # noqa: E402
from trustrl.rollout.sampler import Sampler, SamplerConfig  # noqa: E402
from trustrl.training import step as ts  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--new", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    if a.quick:
        a.rows, a.new, a.repeats = 4, 6, 1
    cfg = dataclasses.replace(default_shape(a.quick), dtype="float32", param_dtype="float32")
    params = M.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, cfg.vocab_size, size=int(n)))
               for n in rng.integers(4, 12, size=a.rows // 2)]
    base = SamplerConfig(max_new_tokens=a.new, temperature=0.7, record_topk=0)
    model = policy.decode_model(cfg)
    samplers = {"sample, clean": Sampler(model, base),
                "sample, noise 0.05": Sampler(model, dataclasses.replace(base, logit_noise=0.05)),
                "sample, pre-temperature trap": Sampler(model, dataclasses.replace(
                    base, record_pre_temperature=True))}
    key = jax.random.key(1)
    runs = {name: (lambda s=s: s.generate(params, prompts, 2, key).rollout_logp)
            for name, s in samplers.items()}
    r = samplers["sample, clean"].generate(params, prompts, 2, key)
    batch = ts.rollout_batch(r, jnp.zeros(r.tokens.shape[0]))
    score = jax.jit(lambda prm, b: ts.score(prm, b, model_cfg=cfg, temperature=0.7))
    runs["rescore (score pass)"] = lambda: score(params, batch)
    best, outs = best_of(runs, a.repeats)
    ref = best["sample, clean"]
    print(f"model {label(cfg)}, {r.tokens.shape[0]} rows x {a.new} new tokens, fp32, "
          f"best of {a.repeats}")
    print("| call | best ms | x clean sample |\n|---|---|---|")
    for name, t in best.items():
        print(f"| {name} | {1e3 * t:.1f} | {t / ref:.2f}x |")
    mask = np.asarray(r.response_mask) > 0
    pi = np.asarray(outs["rescore (score pass)"])
    sampler_gap = float(np.max(np.abs(np.asarray(r.rollout_logp) - pi)[mask]))
    rescored = np.asarray(score(params, batch))  # a second forward: what the loop's rescore is
    print("| mu | max abs(log mu - log pi) on response tokens |\n|---|---|")
    print(f"| float32 sampler (KV-cache decode) | {sampler_gap:.3e} |")
    print(f"| rescored (trainer forward) | {float(np.max(np.abs(rescored - pi)[mask])):.3e} |")
    return {"times": best, "sampler_gap": sampler_gap,
            "rescored_gap": float(np.max(np.abs(rescored - pi)[mask]))}


if __name__ == "__main__":
    main()
