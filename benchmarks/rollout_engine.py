"""The rollout engine's goals (issue 14), each as a ratio against a baseline in the same run.

Run:
    python benchmarks/rollout_engine.py            # the three tables below (~10 min, 2-core CPU)
    python benchmarks/rollout_engine.py --quick    # small sizes, seconds (smoke test)

Table 1, continuous batching on a long-tailed length mix: 256 rows through 32 decode slots,
90% of the rows stop within 1/8 of the cap (uniform in [1, cap/8]), 10% run to the cap. The
lengths are forced by a wrapper around the real model (default CPU shape, random weights,
greedy): the first prompt token picks each row's length, and EOS is forced at that step,
so every variant generates exactly the same tokens. Tokens/s counts generated tokens (the
response masks' sum) over the whole generate call; baselines: the rows as 8 calls of 32 rows
(the sampler before continuous batching, rollout.max_rows = 32), and all 256 rows at once.
Table 2, recording mu's top-K: the sampler with record_topk = 20 (exact chunked top-K, and
lax.top_k) against record_topk = 0, fixed lengths, on the default shape and on a small trunk
with a Qwen-sized vocabulary (V = 151,936) where the head dominates.
Table 3, decode attention at long responses: 16-token prompts + 4,096 new tokens, batch 8,
attention over blocks of 256 cache slots up to the last written one against one pass over
the whole preallocated cache (ModelConfig.decode_block_size = 0).
Table 4, quantised rollouts: weight-only int8 / fp8 (trustrl.model.quant) against bf16 (and fp32),
batch 32, 64 new tokens, K = 20.
Best of --repeats interleaved calls, compile excluded (each variant is warmed up once).

Measured 2026-12-04, 2-core x86 CPU VM (no GPU), jax 0.10.2, idle, default CPU shape
(4L, d=128, V=512) unless said:
  Table 1 (256 rows, cap 128, 14% at the cap, 6,637 tokens = 20% of rows x cap):
    all rows at once 1,676 tok/s (1.01x), 8 calls of 32 rows 1,661 (1.00x),
    continuous with 32 slots 5,464 (3.29x): the >= 3x goal is met.
  Table 2, K = 20 against K = 0 (batch 32, greedy): first run 1.21x (chunked) / 2.51x
    (lax.top_k) on the default shape and 1.69x / 43x at V = 151,936 (652 tok/s at K = 0).
    Two fixes followed, measured with the same sampler in /tmp scripts, 32 new tokens:
    the chunk-max top-K (divergences.top_k) and forcing the sampled token into the K-sets
    after the loop instead of per step: default shape 2.4x -> 1.10x (chunked) / 1.08x (lax);
    at V = 151,936 the chunk-max top-K alone took the top-K op from 25.6 to 6.3 ms a step
    (1.53x of a 54.6 ms step, measured before the second fix). The <= 10% goal is met at
    the default shape; the table was not rerun at V = 151,936 after both fixes (session
    time), so that row is still open.
  Table 3 and 4: not yet measured at full size (session time); --quick runs in the tests.
Measured 2026-12-05, same VM and versions, `--tables=topk,decode,quant --repeats=2`, while the
quantised-rollout sanity study ran two training processes on the same 2 cores (so absolute
tokens/s are low and the ratios noisy, the variants of a table interleaved alike):
  Table 2: default shape K=0 6,923 tok/s, K=20 chunked 8,699 (0.80x), lax 10,235 (0.68x): the
    contended run cannot resolve a 10% difference at this size (K=20 read faster than K=0);
    wide vocabulary (2L, d=256, V=151,936): K=0 325, K=20 chunked 284 tok/s: 1.14x (1.53x before
    the force-after-the-loop fix; the <= 10% goal is not shown at this vocabulary on CPU).
  Table 3 (batch 8, 16 + 4,096 tokens): whole cache 649 tok/s, blocks of 256 790 tok/s: 1.22x,
    the same tokens.
  Table 4 (batch 32, 64 new tokens, K = 20): bf16 7,489, int8 7,370 (0.98x), fp8 7,589
    (1.01x), float32 9,519 tok/s (1.27x: bf16 matmuls are emulated on this CPU). Weight-only
    quantisation dequantises each kernel where it is used, so on CPU it costs about what bf16
    does; its speed-up is a GPU / TPU memory-bandwidth effect this machine cannot show.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402  (puts the repository root on sys.path)
from trustrl.model import transformer as M  # noqa: E402
from trustrl.model import policy  # noqa: E402
from trustrl.model.policy import DecodeModel  # noqa: E402
from trustrl.rollout.sampler import Sampler, SamplerConfig  # noqa: E402

EOS = 1


def forced_length_model(cfg: M.ModelConfig, lengths: np.ndarray) -> DecodeModel:
    """The real model's prefill / decode, with EOS forced at each row's length (looked up by
    its first prompt token in ``lengths`` [V]) and never before: a fixed length mix at the real
    model's cost. The per-row stop position rides in the cache (continuous batching inserts it
    with the row)."""
    base, table = policy.decode_model(cfg), jnp.asarray(lengths, jnp.int32)

    def force(logits, next_pos, stop):
        at_stop = (next_pos == stop)[:, None]
        col = jnp.arange(logits.shape[-1])[None, :] == EOS
        return jnp.where(col, jnp.where(at_stop, 1e9, -1e9), jnp.where(at_stop, -1e9, logits))

    def prefill(params, tokens, positions, valid, cache):
        kv, _ = cache
        logits, kv = base.prefill(params, tokens, positions, valid, kv)
        n = jnp.sum(valid, axis=1).astype(jnp.int32)
        first = jnp.take_along_axis(tokens, jnp.argmax(valid, axis=1)[:, None], axis=1)[:, 0]
        stop = n + table[first] - 1  # the position of the row's EOS
        return force(logits, n, stop), (kv, stop)

    def decode(params, tokens, positions, cache):
        kv, stop = cache
        logits, kv = base.decode(params, tokens, positions, kv)
        return force(logits, positions + 1, stop), (kv, stop)

    return DecodeModel(
        init_cache=lambda b, n: (base.init_cache(b, n), jnp.zeros((b,), jnp.int32)),
        prefill=prefill, decode=decode, vocab_size=cfg.vocab_size,
        insert=lambda cache, new, slots: (base.insert(cache[0], new[0], slots),
                                          cache[1].at[slots].set(new[1], mode="drop")))


def generate_fn(sampler, params, prompts):
    def run():
        r = sampler.generate(params, prompts, 1, jax.random.key(0))
        return jax.block_until_ready(r)
    return run


def table_mix(cfg, rows, slots, cap, repeats):
    rng = np.random.default_rng(0)
    lengths = np.where(rng.random(cfg.vocab_size) < 0.9,
                       rng.integers(1, cap // 8 + 1, cfg.vocab_size), cap + 1)  # cap + 1: never
    model = forced_length_model(cfg, lengths)
    params = M.init_params(cfg, jax.random.key(0))
    prompts = rng.integers(3, cfg.vocab_size, (rows, 16)).tolist()
    base = dict(max_new_tokens=cap, greedy=True, record_topk=20, eos_ids=(EOS,))
    variants = {"all rows at once": SamplerConfig(**base),
                f"{rows // slots} calls of {slots} rows": SamplerConfig(
                    max_rows=slots, continuous=False, **base),
                f"continuous, {slots} slots": SamplerConfig(max_rows=slots, **base)}
    t, outs = bench_common.best_of({k: generate_fn(Sampler(model, c), params, prompts)
                       for k, c in variants.items()}, repeats)
    ref = outs["all rows at once"]
    for k, r in outs.items():  # the same tokens whichever way they were scheduled
        assert np.array_equal(np.asarray(r.response_tokens), np.asarray(ref.response_tokens)), k
    tokens = int(np.asarray(ref.response_mask).sum())
    at_cap = float(np.mean(np.asarray(ref.response_mask).sum(1) == cap))
    print(f"\nTable 1: long-tailed mix, {rows} rows, cap {cap}, {at_cap:.0%} of rows at the cap, "
          f"{tokens} generated tokens ({tokens / (rows * cap):.0%} of rows x cap), K = 20, "
          f"{bench_common.label(cfg)}")
    split = f"{rows // slots} calls of {slots} rows"
    print(f"{'variant':28} | {'seconds':>8} | {'tok/s':>8} | vs {split}")
    for k in variants:
        print(f"{k:28} | {t[k]:8.3f} | {tokens / t[k]:8.0f} | {t[split] / t[k]:5.2f}x")
    return {k: tokens / v for k, v in t.items()}


def table_topk(models, batch, new_tokens, repeats):
    print(f"\nTable 2: recording mu's top-K, batch {batch}, {new_tokens} new tokens, greedy, EOS "
          "off")
    print(f"{'model':34} | {'K=0 tok/s':>9} | {'K=20 chunked':>12} | ratio | {'K=20 lax':>8} | ratio")
    out = {}
    for name, cfg in models:
        params = M.init_params(cfg, jax.random.key(0))
        prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, 16)).tolist()
        runs = {}
        variants = [("k0", 0, "chunked"), ("chunked", 20, "chunked"), ("lax", 20, "lax")]
        if cfg.vocab_size > 65536:  # ~1 s a step (measured: 15 tok/s, 43x): minutes per call
            variants = variants[:2]
        for label, k, method in variants:
            s = Sampler(policy.decode_model(cfg), SamplerConfig(
                max_new_tokens=new_tokens, greedy=True, record_topk=k, topk_method=method))
            runs[label] = generate_fn(s, params, prompts)
        t, _ = bench_common.best_of(runs, repeats)
        n = batch * new_tokens
        lax = (f"{n / t['lax']:8.0f} | {t['lax'] / t['k0']:4.2f}x" if "lax" in t
               else f"{'-':>8} | {'-':>5}")
        print(f"{name:34} | {n / t['k0']:9.0f} | {n / t['chunked']:12.0f} | "
              f"{t['chunked'] / t['k0']:4.2f}x | {lax}")
        out[name] = t
    return out


def table_decode(cfg, batch, new_tokens, repeats, block):
    params = M.init_params(cfg, jax.random.key(0))
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, 16)).tolist()
    runs = {}
    for label, b in (("whole cache", 0), (f"blocks of {block}", block)):
        c = dataclasses.replace(cfg, decode_block_size=b)
        s = Sampler(policy.decode_model(c), SamplerConfig(max_new_tokens=new_tokens,
                                                          greedy=True, record_topk=0))
        runs[label] = generate_fn(s, params, prompts)
    t, outs = bench_common.best_of(runs, repeats)
    a, b = (np.asarray(o.response_tokens) for o in outs.values())
    same = float(np.mean(a == b))
    n = batch * new_tokens
    print(f"\nTable 3: decode attention, batch {batch}, 16 + {new_tokens} tokens "
          f"({16 + new_tokens} cache slots), greedy, {bench_common.label(cfg)}; "
          f"tokens equal: {same:.1%}")
    print(f"{'attention':18} | {'seconds':>8} | {'tok/s':>8} | speed-up")
    whole = t["whole cache"]
    for k, v in t.items():
        print(f"{k:18} | {v:8.3f} | {n / v:8.0f} | {whole / v:5.2f}x")
    return t


def table_quant(cfg, batch, new_tokens, repeats):
    params = M.init_params(cfg, jax.random.key(0))
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, 16)).tolist()
    runs = {}
    for dtype in ("bfloat16", "int8", "fp8", "float32"):
        roll_cfg = policy.rollout_config(cfg, dtype)
        s = Sampler(policy.decode_model(roll_cfg), SamplerConfig(
            max_new_tokens=new_tokens, greedy=True, record_topk=20))
        runs[dtype] = generate_fn(s, policy.cast_params(params, roll_cfg), prompts)
    t, _ = bench_common.best_of(runs, repeats)
    n = batch * new_tokens
    print(f"\nTable 4: rollout precision, batch {batch}, {new_tokens} new tokens, K = 20, "
          f"greedy, EOS off, {bench_common.label(cfg)} (weights dequantised in each matmul)")
    print(f"{'rollout dtype':14} | {'tok/s':>8} | vs bf16")
    for k, v in t.items():
        print(f"{k:14} | {n / v:8.0f} | {t['bfloat16'] / v:5.2f}x")
    return t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tables", default="mix,topk,decode,quant")
    a = p.parse_args(argv)
    tables = a.tables.split(",")
    cfg = bench_common.default_shape(a.quick)
    print(f"devices: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
    out = {}
    if "mix" in tables:
        out["mix"] = (table_mix(cfg, 16, 4, 16, 1) if a.quick
                      else table_mix(cfg, 256, 32, 128, a.repeats))
    if "topk" in tables:
        wide = M.ModelConfig(vocab_size=151936, hidden_size=256, intermediate_size=768,
                             num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64)
        out["topk"] = (table_topk([("quick", cfg)], 4, 4, 1) if a.quick else table_topk(
            [(bench_common.label(cfg), cfg), ("wide vocab (2L, d=256, V=151936)", wide)], 32,
            64, a.repeats))
    if "decode" in tables:
        out["decode"] = (table_decode(cfg, 2, 40, 1, 8) if a.quick
                         else table_decode(cfg, 8, 4096, a.repeats, 256))
    if "quant" in tables:
        out["quant"] = (table_quant(cfg, 2, 4, 1) if a.quick
                        else table_quant(cfg, 32, 64, a.repeats))
    return out


if __name__ == "__main__":
    main()
