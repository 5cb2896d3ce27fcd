"""The exact top-K options for recording mu's K-set, one decode step's op alone.

Run:
    python benchmarks/topk_record.py            # V = 512 / 49,152 / 151,936, batch 32
    python benchmarks/topk_record.py --quick    # small sizes, seconds (smoke test)

The op: jitted, one decode step's [B, V] float32 log-probs -> the K = 20 set with the sampled
token forced in (trustrl.core.divergences.build_topk_set), against the step's unavoidable softmax +
sampling work in the same process (the ratio column):
  * lax.top_k over the whole row: XLA's TopK (what the sampler used first);
  * chunked (the default): the K chunks of --chunk ids with the largest maxima, then lax.top_k
    over those chunks only (exact, ties towards the lower id; divergences.top_k's docstring);
  * approx_max_k (recall_target 0.95; TPU's approximate top-K, an exact fallback elsewhere):
    counted as exact only if its ids equal lax.top_k's on the random inputs (reported).
The sampler with record_topk = 20 against 0 is table 2 of benchmarks/rollout_engine.py.
Best of --repeats interleaved calls, compile excluded.

Measured: see the table below the header of rollout_engine.py's run in docs/performance.md.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402  (puts the repository root on sys.path)
from trustrl.core import divergences  # noqa: E402


def op_table(batch, vocabs, k, repeats, chunk):
    rows = []
    for v in vocabs:
        key = jax.random.key(v)
        logits = jax.random.normal(key, (batch, v), jnp.float32) * 3
        logp = jax.nn.log_softmax(logits, axis=-1)
        tok = jax.random.categorical(jax.random.key(1), logp).astype(jnp.int32)
        step = jax.jit(lambda z, key: jax.random.categorical(
            key, jax.nn.log_softmax(z / 0.7, axis=-1)))
        lax_fn = jax.jit(functools.partial(divergences.build_topk_set, k=k, method="lax"))
        chunk_fn = jax.jit(functools.partial(divergences.build_topk_set, k=k, method="chunked",
                                             chunk=chunk))
        approx = jax.jit(lambda x: jax.lax.approx_max_k(x, k, recall_target=0.95))
        t, _ = bench_common.best_of({
            "step": lambda: step(logits, key), "lax": lambda: lax_fn(logp, tok),
            "chunked": lambda: chunk_fn(logp, tok), "approx": lambda: approx(logp)}, repeats)
        ids_lax, lp_lax = lax_fn(logp, tok)
        ids_c, lp_c = chunk_fn(logp, tok)
        exact_chunked = bool(jnp.all(ids_lax == ids_c) and jnp.all(lp_lax == lp_c))
        exact_approx = bool(jnp.all(approx(logp)[1] == jax.lax.top_k(logp, k)[1]))
        rows.append((v, t, exact_chunked, exact_approx))
    print(f"\nTable 1: K = {k} set of one decode step, batch {batch}, float32, chunk {chunk} "
          f"(ms; ratio = top-K / the step's softmax + sampling)")
    print("   vocab | softmax+sample | lax.top_k (ratio) | chunked (ratio) exact | "
          "approx_max_k (ratio) exact")
    for v, t, ec, ea in rows:
        s = t["step"]
        print(f"{v:8d} | {s * 1e3:14.3f} | {t['lax'] * 1e3:8.3f} ({t['lax'] / s:5.2f}x) | "
              f"{t['chunked'] * 1e3:7.3f} ({t['chunked'] / s:5.2f}x) {str(ec):5s} | "
              f"{t['approx'] * 1e3:8.3f} ({t['approx'] / s:5.2f}x) {ea}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk", type=int, default=divergences.TOPK_CHUNK)
    a = p.parse_args(argv)
    if a.quick:
        return op_table(4, (512, 4096), 20, 1, 16)
    print(f"devices: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
    return op_table(32, (512, 49152, 151936), 20, a.repeats, a.chunk)


if __name__ == "__main__":
    main()
