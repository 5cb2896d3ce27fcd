"""Forward and forward+backward throughput of the trustrl decoder vs transformers (torch, CPU).

Run:
    python benchmarks/model_forward.py                                   # tiny config only
    python benchmarks/model_forward.py --smollm2_dir DIR                 # + SmolLM2-135M (real weights,
                                                                         #   DIR from `python -m trustrl.tools.get_smollm2 DIR`)
    python benchmarks/model_forward.py --smollm2_random                  # + SmolLM2-135M shape, random weights
    python benchmarks/model_forward.py --no_flatten                      # einsum instead of 2-D matmuls
    python benchmarks/model_forward.py --quick                           # tiny sizes, seconds

Both sides run fp32 on the same weights (trustrl exports its params with
trustrl.model.hf.save_hf_dir, or
both load DIR) on one CPU device with the same thread count (torch.set_num_threads = the cores XLA
uses). trustrl: jax.jit of forward_logits, and of value_and_grad of the mean token log-prob
(token_logp_and_entropy). transformers: model(ids).logits under torch.no_grad (its default sdpa
attention), and cross_entropy(logits).backward(). Tokens/s = batch * seq / median step time.
Speed does not depend on the weight values, so --smollm2_random measures the same thing as DIR.

Measured on the 2-core x86 CPU VM (jax 0.10.2, torch 2.13.0, transformers 5.24.0, 2 threads; other
engineers' jobs shared the cores, so ~10% differences are noise):

    model                      | batch x seq | fwd tok/s trustrl | torch | ratio | fwd+bwd tok/s trustrl | torch | ratio
    tiny (4L, d=128, V=512)    |     8 x 128 |             51182 | 56191 | 0.91x |                 14204 | 17783 | 0.80x
    smollm2-135m (real, DIR)   |     4 x 128 |               517 |   540 | 0.96x |                   181 |   163 | 1.11x
    same, --no_flatten:  tiny fwd 57340 / 56516 (1.01x), fwd+bwd 12705 / 15209 (0.84x);
                         smollm2 fwd 611 / 549 (1.11x), fwd+bwd 165 / 148 (1.11x)
    (an earlier run on a quieter moment: smollm2 fwd 1.24x, fwd+bwd 1.14x; tiny fwd+bwd 0.53x)

The 1.5x fwd+bwd goal is NOT met. SmolLM2 at ~140 GFLOP/s forward is near what 2 cores' GEMMs
deliver, for torch (oneDNN) as for XLA, so the remaining gap is not overhead; the tiny config is
latency-bound, where torch's fused CPU sdpa attention beats XLA's unfused attention backward.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402  (puts the repository root on sys.path)
from trustrl.model import hf  # noqa: E402
from trustrl.model import transformer as M  # noqa: E402
from trustrl.model.vocab_head import token_logp_and_entropy  # noqa: E402


def _median_time(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_trustrl(params, cfg, tokens, warmup, repeats):
    ones = jnp.ones_like(tokens)
    positions = M.positions_from_mask(ones)
    fwd = jax.jit(functools.partial(M.forward_logits, config=cfg))

    def loss(p):
        logits = M.forward_logits(p, cfg, tokens[:, :-1], positions[:, :-1], ones[:, :-1])
        return -jnp.mean(token_logp_and_entropy(logits, tokens[:, 1:])[0])

    grad = jax.jit(jax.value_and_grad(loss))
    t_fwd = _median_time(lambda: fwd(params, tokens=tokens, positions=positions,
                                     valid=ones).block_until_ready(), warmup, repeats)
    t_bwd = _median_time(lambda: jax.block_until_ready(grad(params)), warmup, repeats)
    return t_fwd, t_bwd


def bench_torch(model, tokens, warmup, repeats):
    import torch
    ids = torch.tensor(np.array(tokens), dtype=torch.long)

    def fwd():
        with torch.no_grad():
            model(ids).logits

    def fwd_bwd():
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)

    return _median_time(fwd, warmup, repeats), _median_time(fwd_bwd, warmup, repeats)


def run_row(name, cfg, params, hf_dir, batch, seq, args):
    import torch
    import transformers
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)),
                         jnp.int32)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ours = bench_trustrl(params, cfg, tokens, args.warmup, args.repeats)
    theirs = bench_torch(model, tokens, args.warmup, args.repeats)
    n = batch * seq
    return (name, f"{batch} x {seq}", n / ours[0], n / theirs[0], theirs[0] / ours[0],
            n / ours[1], n / theirs[1], theirs[1] / ours[1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smollm2_dir", default="", help="SmolLM2-135M HF directory")
    p.add_argument("--smollm2_random", action="store_true",
                   help="benchmark the SmolLM2-135M shape with random weights when no dir")
    p.add_argument("--no_flatten", action="store_true", help="einsum instead of 2-D matmuls")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    flat = not args.no_flatten
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(bench_common.default_shape(args.quick), flatten_matmuls=flat)
        params = bench_common.export_random(cfg, os.path.join(tmp, "tiny"))
        batch, seq = (2, 16) if args.quick else (8, 128)
        rows.append(run_row(bench_common.label(cfg), cfg, params, os.path.join(tmp, "tiny"),
                            batch, seq, args))

        if args.smollm2_dir:
            cfg, params = hf.load_hf_dir(args.smollm2_dir)
            cfg = dataclasses.replace(cfg, flatten_matmuls=flat)
            rows.append(run_row("smollm2-135m", cfg, params, args.smollm2_dir, 4, 128, args))
        elif args.smollm2_random:
            cfg = M.ModelConfig.smollm2_135m(flatten_matmuls=flat)
            params = bench_common.export_random(cfg, os.path.join(tmp, "smollm2"))
            rows.append(run_row("smollm2-135m (random w)", cfg, params,
                                os.path.join(tmp, "smollm2"), 4, 128, args))
        else:
            print("smollm2-135m: skipped (pass --smollm2_dir DIR from "
                  "`python -m trustrl.tools.get_smollm2 DIR`, or --smollm2_random)")

    print(f"threads={args.threads} flatten_matmuls={flat} "
          f"median of {args.repeats} after {args.warmup} warm-up")
    header = (f"{'model':26} | {'batch x seq':>11} | {'fwd tok/s trustrl':>17} | {'torch':>9} | "
              f"{'ratio':>6} | {'fwd+bwd tok/s trustrl':>21} | {'torch':>9} | {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for name, shape, f_ours, f_torch, f_ratio, b_ours, b_torch, b_ratio in rows:
        print(f"{name:26} | {shape:>11} | {f_ours:17.0f} | {f_torch:9.0f} | {f_ratio:5.2f}x | "
              f"{b_ours:21.0f} | {b_torch:9.0f} | {b_ratio:5.2f}x")
    return rows


if __name__ == "__main__":
    main()
