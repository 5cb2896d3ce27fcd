"""Fused, chunked vocabulary head vs the plain one: compiled memory and time, in one run.

Run:
    python benchmarks/vocab_head.py            # V = 151,936; d = 1,024 / 4,096; 4k / 16k tokens
    python benchmarks/vocab_head.py --quick    # tiny shapes, seconds (the test runs this)

Memory: ``jax.jit(jax.grad(loss))`` lowered on abstract bf16 hidden states [T, d] and a bf16
head weight [V, d] (tied layout, as Qwen3-0.6B), compiled for one CPU device; XLA's memory
analysis, temp bytes (the arguments are the same for both). Two workloads:
  "binary": logp (differentiated) + entropy, what dppo_binary_* / PPO / GRPO need;
  "full":   the same + mu's hidden states and weight, exact TV and KL(mu || pi) (dppo_full_*).
Heads: "plain" (full [T, V] logits), "fused" (chunks, recomputing backward: 4 head matmuls),
"loss-fused" (fused + the loss's d loss / d logp given to the head, as the train step does: the
weight gradient is formed in the forward pass from the tile in memory, 3 matmuls).
Time: the same functions on real arrays, forward + backward and forward only, the best of
``--repeats`` interleaved rounds after a warm-up, for the shapes in ``--time_shapes`` (the plain
head's [T, V] float32 logits at 16k tokens (10 GB, plus log_softmax / exp copies) do not fit a
24 GiB CPU machine, so time is measured at 4k by default). Ratios are against plain.

Measured: see docs/performance.md (the "Vocabulary head" section).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from trustrl.model import vocab_head as vh  # noqa: E402

GiB = 2 ** 30
VOCAB = 151936


def _fn(kind: str, workload: str, grad: bool, token_chunk=0, temperature=1.0):
    """kind: plain | fused (recomputing backward) | loss_fused (the loss's d / d logp, here
    1 / tokens for the mean, given to the head: its weight gradient is formed in the forward)."""
    def outputs(h, w, y, hm, wm):
        kw = dict(mu_hidden=hm, mu_w=wm) if workload == "full" else {}
        if kind == "loss_fused":
            g = 1.0 / y.shape[0]
            kw["logp_grad"] = (lambda out, ex: jnp.full_like(out["logp"], g), {})
        if kind != "plain":
            return vh.fused_head(h, w, y, w_vocab_axis=0, temperature=temperature,
                                 token_chunk=token_chunk, **kw)
        return vh.plain_head(h, w, y, w_vocab_axis=0, temperature=temperature, **kw)

    def loss(h, w, y, hm, wm):  # the metrics come back too, so XLA cannot drop them
        out = outputs(h, w, y, hm, wm)
        return jnp.mean(out["logp"]), {k: jnp.mean(v) for k, v in out.items() if k != "logp"}

    if grad:
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    return jax.jit(lambda *a: jax.tree.map(jnp.sum, outputs(*a)))


def _args(t, d, v, abstract: bool, seed=0):
    shapes = [((t, d), jnp.bfloat16), ((v, d), jnp.bfloat16), ((t,), jnp.int32),
              ((t, d), jnp.bfloat16), ((v, d), jnp.bfloat16)]
    if abstract:
        return [jax.ShapeDtypeStruct(s, dt) for s, dt in shapes]
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    h = jax.random.normal(k[0], (t, d), jnp.bfloat16)
    w = (jax.random.normal(k[1], (v, d), jnp.float32) * 0.05).astype(jnp.bfloat16)
    y = jax.random.randint(k[2], (t,), 0, v)
    return [h, w, y, (h.astype(jnp.float32) * 0.99).astype(jnp.bfloat16),
            (w.astype(jnp.float32) * 1.01).astype(jnp.bfloat16)]


def memory(t, d, v, kind, workload, token_chunk=0) -> float:
    compiled = _fn(kind, workload, True, token_chunk).lower(*_args(t, d, v, True)).compile()
    return compiled.memory_analysis().temp_size_in_bytes / GiB


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    p.add_argument("--time_shapes", default="1024x4096",
                   help="comma-separated dxT shapes to time ('' = memory only)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--token_chunk", type=int, default=0,
                   help="fused head tokens per chunk (0: automatic, as ModelConfig's default)")
    args = p.parse_args(argv)
    chunk = args.token_chunk
    if args.quick:
        v, dims, lengths, time_shapes = 4096, (32,), (256, 1024), [(32, 512)]
        chunk = chunk or 128
    else:
        v, dims, lengths = VOCAB, (1024, 4096), (4096, 16384)
        try:
            time_shapes = [tuple(int(x) for x in s.split("x"))
                           for s in args.time_shapes.split(",") if s]
        except ValueError:
            raise SystemExit(f"--time_shapes={args.time_shapes!r}: expected e.g. 1024x4096")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, V = {v}, bf16 inputs, "
          "float32 accumulation", flush=True)
    results = {"memory": [], "time": []}
    print("| d | tokens | workload | plain temp GiB | fused temp GiB | loss-fused temp GiB | "
          "plain / fused | plain / loss-fused |")
    print("|---|---|---|---|---|---|---|---|")
    for d in dims:
        for t in lengths:
            for workload in ("binary", "full"):
                plain = memory(t, d, v, "plain", workload)
                fused = memory(t, d, v, "fused", workload, chunk)
                lfused = memory(t, d, v, "loss_fused", workload, chunk)
                results["memory"].append(dict(d=d, t=t, workload=workload, plain=plain,
                                              fused=fused, loss_fused=lfused))
                print(f"| {d} | {t} | {workload} | {plain:.2f} | {fused:.3f} | {lfused:.3f} | "
                      f"{plain / fused:.1f}x | {plain / lfused:.1f}x |", flush=True)
    if time_shapes:
        print("\n| d | tokens | workload | pass | plain s | fused s | loss-fused s | "
              "fused / plain | loss-fused / plain |")
        print("|---|---|---|---|---|---|---|---|---|")
    for d, t in time_shapes:
        for workload in ("binary", "full"):
            for grad in (True, False):
                # interleaved, best of `repeats` rounds: a busy machine slows all three alike
                kinds = ("plain", "fused", "loss_fused") if grad else ("plain", "fused")
                fns = {k: (_fn(k, workload, grad, 0 if k == "plain" else chunk),
                           _args(t, d, v, False)) for k in kinds}
                best = {k: float("inf") for k in kinds}
                for k, (fn, a) in fns.items():
                    jax.block_until_ready(fn(*a))  # compile + warm up
                for _ in range(args.repeats):
                    for k, (fn, a) in fns.items():
                        t0 = time.perf_counter()
                        jax.block_until_ready(fn(*a))
                        best[k] = min(best[k], time.perf_counter() - t0)
                plain, fused = best["plain"], best["fused"]
                lfused = best.get("loss_fused", fused)  # no gradient: the same forward
                name = "fwd+bwd" if grad else "fwd"
                results["time"].append(dict(d=d, t=t, workload=workload, grad=grad,
                                            plain=plain, fused=fused, loss_fused=lfused))
                print(f"| {d} | {t} | {workload} | {name} | {plain:.3f} | {fused:.3f} | "
                      f"{lfused:.3f} | {fused / plain:.2f}x | {lfused / plain:.2f}x |",
                      flush=True)
    return results


if __name__ == "__main__":
    main()
