"""Cost of the trust-region losses and of the exact full-vocabulary divergence.

Run:
    python benchmarks/loss_overhead.py            # full sizes, ~1 minute on a 2-core CPU
    python benchmarks/loss_overhead.py --quick    # small sizes, < 30 s (used by tests/test_benchmarks.py)
    python benchmarks/loss_overhead.py --batch 1024 --seq 1024 --repeats 15 --no-full \
        --methods dppo_binary_tv,icepop,kpop,opsm,geo_seq_mask   # issue 32's rows at 1M tokens
        (and --methods dppo_binary_tv,drpo,m2po)

Issue 32's rows at 1M tokens (B=1024, T=1024, median of 15; 2-core VM at load average 3.5-5,
other jobs running, so +-30% is noise; two runs):

    method         | ms (run 1 / run 2) | vs dppo_binary_tv | ms +metrics     | vs dppo +metrics
    dppo_binary_tv |  4.8 /  6.0        | 1                 | 25.9 / 46.4     | 1
    icepop         |  3.0 /  5.0        | 0.63x / 0.84x     | 24.6 / 36.4     | 0.95x / 0.78x
    kpop           | 25.2 / 38.7        | 5.2x  / 6.5x      | 28.9 / 61.5     | 1.11x / 1.33x
    opsm           |  5.0 /  4.5        | 1.05x / 0.74x     | 15.3 / 13.3     | 0.59x / 0.29x
    geo_seq_mask   |  4.5 /  6.3        | 0.94x / 1.06x     | 12.8 / 16.6     | 0.49x / 0.36x

Goal "within 1.1x of dppo_binary_tv": met by icepop, opsm, geo_seq_mask; NOT met by kpop (two
Bernoulli KLs: exp, expm1 and a two-branch log1mexp for pi and for mu, as dppo_binary_kl, whose
cost is the same problem; run 2 already shares the four transcendental sets between the two
directions).

DRPO and M2PO (issue 32), same command with --methods dppo_binary_tv,drpo,m2po (B=1024, T=1024,
median of 15, load average 4.7-5.9, two runs):

    method         | ms (run 1 / run 2) | vs dppo_binary_tv | ms +metrics     | vs dppo +metrics
    dppo_binary_tv |   8.8 /   7.7      | 1                 |  46.3 /  43.0   | 1
    drpo           |  10.5 /   8.8      | 1.20x / 1.14x     |  49.4 /  47.3   | 1.07x / 1.10x
    m2po           | 426.8 / 408.7      | 49x   / 53x       | 480.1 / 447.2   | 10.4x / 10.4x

drpo: the penalty's exp / square and its backward, near the 1.1x goal (met with metrics, not in
isolation). m2po: NOT met: its minibatch mask sorted all 1M m2 values (XLA:CPU's sort, ~0.4 s);
the train step computes it once per minibatch, outside the micro-batch loop.

m2po without the sort (2026-12-07: losses.m2po_blocked bisects the cut over float32 bit
patterns, 32 masked sums; same command, load average 5.8, two study runs on the 2 cores):

    method         |      ms | vs dppo_binary_tv | ms +metrics | vs dppo +metrics
    dppo_binary_tv |   7.97  | 1                 |  41.5       | 1
    drpo           |   9.21  | 1.16x             |  48.1       | 1.16x
    m2po           |  36.1   | 4.5x  (was 49-53x)|  56.4       | 1.36x (was 10.4x)

Still NOT within 1.1x: 32 passes over the minibatch's m2 (~1 ms each here) against dppo's
two exps; the standalone mask went from ~600 ms to ~55-90 ms in /tmp runs of both versions.
With the tie rank as an int32 associative_scan instead of jnp.cumsum (1-D cumsum of 1M: ~8-12
ms on XLA:CPU; the scan ~2-3 ms), same command with --methods dppo_binary_tv,m2po,cppo on an
idle VM (load average 1.3, 2026-12-08): dppo_binary_tv 4.43 ms, m2po 19.1 ms (4.3x; +metrics
36.2 / 25.1 ms, 1.44x), cppo 8.08 ms (1.83x; +metrics 1.10x).

The script sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before importing jax, so the
sharded rows run on 8 simulated CPU devices on any machine.

Table 1: jitted jax.value_and_grad of trustrl.core.losses.policy_loss w.r.t. logp (loss + gradient;
the metrics dict is not returned, so XLA drops it) for every method in trustrl.core.losses.METHODS
on the same [B, T] inputs, median of N interleaved repeats after warm-up, relative to ppo_clip.
Methods that take a divergence get it as an input (the train step computes it); the "+ topk_*"
rows also compute topk_tv / topk_kl from [B, T, K=20] log-probs inside the same jit.

Table 2: exact full-vocabulary TV / KL(mu || pi) (trustrl.core.divergences.full_tv / full_kl) from
two
fp32 logits arrays [8, 128, V = 151,936] (1,024 tokens, 2 x 622 MB), unsharded on one device vs
the vocabulary sharded over a make_mesh({data: 1, fsdp: 1, tensor: 8}) mesh. Memory is the
compiled executable's memory_analysis() per device: arguments + outputs + temporaries.

Measured (full sizes) on a 2-core x86 CPU VM, jax 0.10.2, 8 simulated host devices; other engineers'
processes may have been running on the same 2 cores, so single-digit-% differences are noise:

    Table 1: loss + gradient, B=64 T=1024 (65,536 tokens), median of 100
    method                       |      ms | ratio vs ppo_clip | ms +metrics | ratio +metrics
    ----------------------------------------------------------------------------------------------
    dppo_binary_tv               |   0.441 |            1.183x |       0.862 |         1.017x
    dppo_binary_kl               |   0.796 |            2.138x |       1.433 |         1.690x
    dppo_topk_tv                 |   0.371 |            0.995x |       0.815 |         0.962x
    dppo_topk_kl                 |   0.374 |            1.004x |       0.867 |         1.023x
    dppo_full_tv                 |   0.371 |            0.996x |       0.881 |         1.039x
    dppo_full_kl                 |   0.383 |            1.028x |       0.901 |         1.063x
    dppo_binary_tv_recompute     |   0.446 |            1.197x |       0.957 |         1.128x
    dppo_binary_kl_recompute     |   0.789 |            2.118x |       1.293 |         1.525x
    ppo_clip                     |   0.372 |            1.000x |       0.848 |         1.000x
    ppo_clip_recompute           |   0.392 |            1.053x |       0.940 |         1.109x
    pg_is                        |   0.343 |            0.922x |       0.871 |         1.027x
    cispo                        |   0.338 |            0.907x |       0.874 |         1.031x
    relax_high                   |   0.426 |            1.144x |       0.907 |         1.070x
    relax_low                    |   0.431 |            1.158x |       0.841 |         0.992x
    relax_both                   |   0.433 |            1.162x |       0.842 |         0.993x
    mask_neg                     |   0.427 |            1.146x |       0.885 |         1.044x
    trm_seq                      |   0.409 |            1.099x |       0.977 |         1.152x
    dppo_topk_tv + topk_tv(K=20) |   2.915 |            7.827x |       3.350 |         3.951x
    dppo_topk_kl + topk_kl(K=20) |   3.508 |            9.419x |       4.263 |         5.028x

    Table 2: exact divergence, [8, 128, 151,936] fp32 logits x 2 (1,024 tokens), median of 5
    divergence | layout                   |        ms | per-device MiB:     args |   temps |     peak
    ---------------------------------------------------------------------------------------------------
    full_tv    | unsharded (1 device)     |    1575.5 |                   1187.0 |     0.0 |   1187.0
    full_kl    | unsharded (1 device)     |    1854.2 |                   1187.0 |     0.0 |   1187.0
    full_tv    | vocab sharded (tensor=8) |     241.4 |                    148.4 |     0.0 |    148.4
    full_kl    | vocab sharded (tensor=8) |     216.6 |                    148.4 |     0.0 |    148.4

    (full run: 48 s wall; load average ~2.8 during the run, i.e. other jobs shared the 2 cores)

Reading:
* Goal "binary methods <= 1.05x ppo_clip": NOT met for the loss in isolation. dppo_binary_tv is
  ~1.18x (two extra exp per token for |pi - mu|, on top of the ratio's one exp); with the metrics
  dict computed, as the train step does, it is ~1.02x, because the metrics already need exp(logp)
  and exp(rollout_logp) for "mean |pi - mu|" and XLA shares them. dppo_binary_kl is ~2.1x in
  isolation (~1.7x with metrics): divergences.binary_kl evaluates exp, expm1, log and log1p for mu
  AND for pi (jnp.where computes both branches of log1mexp), ~8 transcendentals per token. A
  standalone probe on [64, 1024]: ratio exp 0.11 ms, binary_tv 0.14 ms, binary_kl 0.30 ms, and a
  binary KL with log(-expm1) only (no branch) 0.18 ms. In absolute terms all of these are < 1 ms
  per 64k tokens, negligible next to one forward + backward of any LM on the same tokens.
* The other mask-only methods are within ~1.0-1.15x, i.e. within this machine's noise. Computing
  the top-K divergence (K = 20) costs ~2.5-3 ms per 64k tokens (exp + logsumexp over [B, T, 20]).
* Exact divergence: the vocabulary-sharded version holds 1/8 of the logits per device (148 MiB vs
  1187 MiB; XLA fuses log-softmax into the reductions, so temporaries are ~0). Its ~7x speed-up
  here is an XLA:CPU artefact, not a property of sharding: 8 simulated devices share 2 cores, and
  XLA:CPU reduces long rows slowly (the same single-device full_tv on [1024, 151936] takes 1.7 s,
  on the identical data reshaped to [8192, 18992] 0.17 s). Expect different ratios on TPU / GPU.

CPPO (issue 32), --methods dppo_binary_tv,cppo at B=1024, T=1024, median of 15, 2026-12-07, one
study run beside it (load average ~2): dppo_binary_tv 8.2 ms, cppo 27.1 ms (3.3x; +metrics 41.6
/ 60.1 ms, 1.45x). NOT within 1.1x: the row needs two prefix sums along the response
(associative_scan, ~4 ms each at 1M tokens on this CPU) and counts for the clipped quantile
(the per-row sort runs only when some row's quantile falls inside [delta_b, 2 delta_b]; with a
sort every time it was 212 ms). Since the prefix sums are blocked triangular matmuls
(losses._prefix_sum; 2026-12-07 later, --methods dppo_binary_tv,cppo,minpro_clip, two study runs
beside it, load average 5.3): dppo_binary_tv 9.35 ms, cppo 21.6 ms (2.3x; +metrics 54.9 / 43.9
ms, 1.25x), minpro_clip 14.7 ms (1.58x; +metrics 1.05x). Still NOT within 1.1x.

MinPRO (minpro_clip, issue 32), --methods dppo_binary_tv,minpro_clip (,ppo_clip) at B=1024,
T=1024, median of 15, 2026-12-07, two study runs beside it (load average 4.6-5.6), two runs:
dppo_binary_tv 11.6 / 7.0 ms, minpro_clip 14.0 / 16.4 ms (1.20x / 2.35x; +metrics 1.03x /
1.13x), ppo_clip 6.4 / 5.2 ms. NOT within 1.1x: the prefix minimum along the response is an
associative_scan (as CPPO's prefix sums); the rest is ppo_clip's work.
"""
from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import argparse  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding  # noqa: E402

from trustrl.core import divergences, losses  # noqa: E402
from trustrl.infra.sharding import make_mesh  # noqa: E402

# Thresholds per method family (PAPER secs. 3-4); they do not change the cost.
_DELTAS = {
    "ppo_clip": (0.2, 0.28), "ppo_clip_recompute": (0.2, 0.28), "cispo": (0.2, 0.28),
    "relax_high": (0.2, 0.28), "relax_low": (0.2, 0.28), "relax_both": (0.2, 0.28),
    "dppo_binary_kl": (0.05, 0.05), "dppo_binary_kl_recompute": (0.05, 0.05),
    "dppo_topk_kl": (0.05, 0.05), "dppo_full_kl": (0.05, 0.05), "mask_neg": (0.5, 0.5),
    "opsm": (0.2, 0.28),  # GRPO-ClipHigher eps under the sequence mask (DeepSeek-V3.2)
}
# The other methods' own parameters (losses.PARAMS) take their defaults.
_TOPK_FNS = {"dppo_topk_tv": divergences.topk_tv, "dppo_topk_kl": divergences.topk_kl}


def make_inputs(batch, seq, k, seed=0):
    """Synthetic rollout: mu log-uniform in [1e-4, 1], pi a perturbation, ragged response mask."""
    keys = jax.random.split(jax.random.key(seed), 8)
    shape = (batch, seq)
    rollout_logp = jax.random.uniform(keys[0], shape, minval=jnp.log(1e-4), maxval=0.0)
    logp = jnp.minimum(rollout_logp + 0.3 * jax.random.normal(keys[1], shape), 0.0)
    old_logp = jnp.minimum(rollout_logp + 0.05 * jax.random.normal(keys[2], shape), 0.0)
    advantages = jax.random.normal(keys[3], (batch,))
    lengths = jax.random.randint(keys[4], (batch, 1), seq // 2, seq + 1)
    mask = (jnp.arange(seq)[None, :] < lengths).astype(jnp.float32)
    divergence = divergences.binary_tv(logp, rollout_logp)
    # top-K log-probs of mu and of pi at mu's ids: K + 1 buckets, the last one is "other".
    logits_k = 2.0 * jax.random.normal(keys[5], shape + (k + 1,))
    lmu_k = jax.nn.log_softmax(logits_k)[..., :k]
    lpi_k = jax.nn.log_softmax(logits_k + 0.2 * jax.random.normal(keys[6], logits_k.shape))[..., :k]
    arrays = dict(logp=logp, rollout_logp=rollout_logp, advantages=advantages, mask=mask,
                  old_logp=old_logp, divergence=divergence, lpi_k=lpi_k, lmu_k=lmu_k)
    return jax.block_until_ready(arrays)


def make_step(method, topk_fn=None, with_metrics=False):
    """jit(value_and_grad of policy_loss w.r.t. logp) for one method; same signature for all.

    Without metrics only (loss, grad) are returned and XLA drops the metrics computation.
    """
    delta_low, delta_high = _DELTAS.get(method, (0.2, 0.2))

    def step(logp, rollout_logp, advantages, mask, old_logp, divergence, lpi_k, lmu_k):
        if topk_fn is not None:
            divergence = topk_fn(lpi_k, lmu_k)
        extra = {}
        spec = losses.METHODS[method]
        if spec.divergence and spec.divergence != "m2po":  # m2po: its batch mask, computed
            extra["divergence"] = divergence                # inside (the sort is its cost)
        if spec.needs_old_logp:
            extra["old_logp"] = old_logp
        if spec.needs_alpha:
            extra["alpha"] = 0.1

        def loss_fn(lp):
            return losses.policy_loss(lp, rollout_logp, advantages, mask, method=method,
                                      delta_low=delta_low, delta_high=delta_high, **extra)

        (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(logp)
        return (loss, grad, metrics) if with_metrics else (loss, grad)

    return jax.jit(step)


def time_interleaved(fns, args, repeats, warmup, seed=0):
    """Median wall ms per fn.

    Each round runs every fn once, in a fresh random order: machine-load drift hits all fns alike,
    and no fn is always the one that runs right after the heaviest (cold caches).
    """
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    rng = random.Random(seed)
    names = list(fns)
    for _ in range(repeats):
        rng.shuffle(names)
        for name in names:
            fn = fns[name]
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def bench_losses(batch, seq, k, repeats, warmup, methods=None):
    """methods: the METHODS rows to time (None: all, plus the top-K rows); ppo_clip, the
    baseline of the ratios, is always timed."""
    x = make_inputs(batch, seq, k)
    args = tuple(x[n] for n in ("logp", "rollout_logp", "advantages", "mask", "old_logp",
                                "divergence", "lpi_k", "lmu_k"))
    chosen = list(losses.METHODS) if methods is None else ["ppo_clip"] + [
        m for m in methods if m != "ppo_clip"]
    specs = {m: (m, None) for m in chosen}
    for m, fn in _TOPK_FNS.items() if methods is None else ():
        specs[f"{m} + {fn.__name__}(K={k})"] = (m, fn)
    fns = {}
    for name, (m, fn) in specs.items():
        fns[name] = make_step(m, fn)
        fns[name, "metrics"] = make_step(m, fn, with_metrics=True)
    ms = time_interleaved(fns, args, repeats, warmup)
    base, base_m = ms["ppo_clip"], ms["ppo_clip", "metrics"]
    return [(name, ms[name], ms[name] / base, ms[name, "metrics"], ms[name, "metrics"] / base_m)
            for name in specs]


def bench_full(batch, seq, vocab, repeats, warmup, n_shards=8):
    """Exact TV / KL: unsharded on device 0 vs vocabulary sharded over n_shards devices."""
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": n_shards},
                     devices=jax.devices()[:n_shards])
    shape = (batch, seq, vocab)
    layouts = {
        "unsharded (1 device)": (SingleDeviceSharding(jax.devices()[0]), None),
        f"vocab sharded (tensor={n_shards})": (NamedSharding(mesh, P(None, None, "tensor")), mesh),
    }
    rows = []
    for layout, (sharding, m) in layouts.items():
        # Materialise directly in the target layout (never build on one device and reshard).
        make = jax.jit(lambda key: jax.random.normal(key, shape, jnp.float32) * 3.0,
                       out_shardings=sharding)
        logits_mu = make(jax.random.key(1))
        logits_pi = jax.block_until_ready(make(jax.random.key(2)))
        for kind, fn in (("full_tv", divergences.full_tv), ("full_kl", divergences.full_kl)):
            jitted = jax.jit(lambda a, b, fn=fn, m=m: fn(a, b, mesh=m))
            compiled = jitted.lower(logits_mu, logits_pi).compile()
            mem = compiled.memory_analysis()
            ms = time_interleaved({kind: compiled}, (logits_mu, logits_pi), repeats, warmup)[kind]
            args_b, temp_b = mem.argument_size_in_bytes, mem.temp_size_in_bytes
            peak_b = args_b + mem.output_size_in_bytes + temp_b - mem.alias_size_in_bytes
            rows.append((kind, layout, ms, args_b / 2**20, temp_b / 2**20, peak_b / 2**20))
        del logits_mu, logits_pi
    return rows


def format_loss_table(rows):
    w = max(len(r[0]) for r in rows)
    lines = [f"{'method':<{w}} | {'ms':>7} | ratio vs ppo_clip | {'ms +metrics':>11} | "
             "ratio +metrics", "-" * (w + 66)]
    lines += [f"{name:<{w}} | {ms:7.3f} | {ratio:16.3f}x | {ms_m:11.3f} | {ratio_m:13.3f}x"
              for name, ms, ratio, ms_m, ratio_m in rows]
    return "\n".join(lines)


def format_full_table(rows):
    w = max(len(r[1]) for r in rows)
    lines = [f"{'divergence':<10} | {'layout':<{w}} | {'ms':>9} | per-device MiB: "
             f"{'args':>8} | {'temps':>7} | {'peak':>8}", "-" * (w + 75)]
    lines += [f"{k:<10} | {lay:<{w}} | {ms:9.1f} | {'':15} {a:8.1f} | {t:7.1f} | {p:8.1f}"
              for k, lay, ms, a, t, p in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (< 30 s)")
    parser.add_argument("--batch", type=int, help="loss batch B (default 64, quick 8)")
    parser.add_argument("--seq", type=int, help="loss length T (default 1024, quick 512)")
    parser.add_argument("--topk", type=int, default=20, help="K of the top-K rows")
    parser.add_argument("--full-batch", type=int, help="exact-divergence batch (default 8, quick 1)")
    parser.add_argument("--full-seq", type=int, help="exact-divergence length (default 128, quick 32)")
    parser.add_argument("--vocab", type=int, default=151_936, help="vocabulary (divisible by 8)")
    parser.add_argument("--repeats", type=int, help="timed repeats (default 100, quick 20)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--full-repeats", type=int, help="exact-divergence repeats (default 5, quick 3)")
    parser.add_argument("--methods", help="comma-separated METHODS rows only (ppo_clip always; "
                        "no top-K rows); default: every method")
    parser.add_argument("--no-full", action="store_true", help="skip Table 2")
    a = parser.parse_args(argv)
    methods = None
    if a.methods:
        methods = [m.strip() for m in a.methods.split(",") if m.strip()]
        for m in methods:
            losses.method_spec(m)  # a ValueError naming the valid methods
    q = a.quick
    pick = lambda v, full, quick: v if v is not None else (quick if q else full)
    batch, seq = pick(a.batch, 64, 8), pick(a.seq, 1024, 512)
    fbatch, fseq = pick(a.full_batch, 8, 1), pick(a.full_seq, 128, 32)
    repeats, frepeats = pick(a.repeats, 100, 20), pick(a.full_repeats, 5, 3)

    print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform} devices, "
          f"{os.cpu_count()} host cores")
    print(f"\nTable 1: loss + gradient, B={batch} T={seq} ({batch * seq:,} tokens), "
          f"median of {repeats}")
    loss_rows = bench_losses(batch, seq, a.topk, repeats, a.warmup, methods)
    print(format_loss_table(loss_rows))
    if a.no_full:
        return {"loss_rows": loss_rows, "full_rows": []}
    print(f"\nTable 2: exact divergence, [{fbatch}, {fseq}, {a.vocab:,}] fp32 logits x 2 "
          f"({fbatch * fseq:,} tokens), median of {frepeats}")
    full_rows = bench_full(fbatch, fseq, a.vocab, frepeats, min(a.warmup, 1))
    print(format_full_table(full_rows))
    return {"loss_rows": loss_rows, "full_rows": full_rows}


if __name__ == "__main__":
    main()
