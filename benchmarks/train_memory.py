"""Compiled memory and compile time of the real train step, per attention backend and remat policy.

Run:
    python benchmarks/train_memory.py                # Qwen3-0.6B shape, the two lengths below
    python benchmarks/train_memory.py --small        # tiny shapes, seconds (the test runs this)
    python benchmarks/train_memory.py --only=1x16384 # one of the two shapes

What is measured: ``jax.jit(trustrl.training.step.train_step, donate_argnums=0)`` (dppo_binary_tv,
fp32 master weights, bf16 compute, AdamW + clipping, as configs/qwen3_tpu.py) lowered on ABSTRACT
params / optimizer state / batch (jax.ShapeDtypeStruct: nothing is allocated) and compiled for
one CPU device; ``compiled.memory_analysis()`` gives temp + argument + output bytes (the donated
state's outputs alias its arguments, so "total" counts alias bytes once). Shapes: Qwen3-0.6B
(28 layers, d=1024, 16 q / 8 kv heads of 128, ffn 3072, vocab 151,936, tied embeddings) at
16 x (512 prompt + 512 response) and 1 x (1,024 + 15,360). Rows: each attention backend usable
on CPU ("cudnn" needs a GPU; "splash" compiles on CPU only in Pallas interpret mode, which is
not the kernel a TPU runs, so it is not measured here) x remat policy, scanned layers, against
today's path (xla attention, unrolled layers, no remat) compiled in the same run; ratios are
baseline / row. "head" is the vocabulary head alone (lm_head + float32 log_softmax / entropy,
forward + backward at the same token count): the part of the remainder a fused, chunked head
(a later issue) removes.

Measured 2026-12-01 on the shared 2-core x86 CPU VM (jax 0.10.2; ~6 other engineers' jobs on the
cores, load ~15, so compile times are inflated several-fold; memory is exact), 1 x (1,024 + 15,360):

    variant                              | total GiB | vs today | compile s | vs today
    xla, unrolled, remat none (today)    |   1432.69 |    1.00x |     572.3 |    1.00x
    xla, scan, remat full                |     86.08 |   16.64x |     131.7 |    4.35x
    blockwise, scan, remat none          |    118.48 |   12.09x |     142.3 |    4.02x
    blockwise, scan, remat dots          |     66.89 |   21.42x |     139.5 |    4.10x
    blockwise, scan, remat full (default)|     47.64 |   30.07x |      78.9 |    7.25x
    blockwise, unrolled, remat full      |     98.22 |   14.59x |     524.2 |    1.09x
    head only (fwd+bwd)                  |     29.00 |        - |       2.8 |        -

Goals met: <= 64 GiB at 16k, compile <= 1/3 of unrolled. The 16 x (512 + 512) rows did not
finish in that session; measured 2026-12-02 (idle, fused head in every row): today 138.71 GiB /
51.9 s compile -> defaults 14.21 GiB / 11.7 s. Full tables: docs/performance.md.

``--tables=head`` (issue 12): the defaults with the plain vs the fused vocabulary head, measured
2026-12-02 on the same VM, idle (total GiB, plain -> fused): 1 x (1,024 + 15,360) dppo_binary_tv
47.64 -> 14.21, dppo_full_tv 58.10 -> 15.89; 16 x (512 + 512) dppo_binary_tv 31.42 -> 14.21,
dppo_full_tv 37.82 -> 15.86. The layers table above predates the fused head (its rows now
include it).

Rerun 2026-12-05 with a third row per case, the loss-fused head the train step now uses
(the loss's d loss / d logp handed to the head, train_step's head="loss_fused"): the same totals as the
fused head to 0.01 GiB (14.21 / 15.89 GiB at 1 x 16k, 14.21 / 15.86 GiB at 16 x 1k).

``--tables=micro``: ``train.microbatches`` (gradient accumulation in the step), defaults,
dppo_binary_tv, measured 2026-12-02, idle VM (total GiB): 128 x (512 + 512): 1 -> 42.71,
8 -> 16.67, 32 -> 14.09 (3.03x less); 16 x (512 + 512): 1 -> 14.21, 4 -> 14.08, 16 -> 13.51
(there the float32 gradients, the accumulator and the bf16 weights dominate, not activations).

Rerun 2026-12-07 at 7ddaab0 (transformer.bits_residual: the saved layer inputs as uint16 bit
patterns, so XLA:CPU holds no float32 copy of their stack): the defaults are 13.34 GiB at
16 x (512 + 512) and 13.33 GiB at 1 x (1,024 + 15,360) (were 14.21); dppo_full_tv 14.89 / 14.84;
the rows rerun and those not: docs/performance.md, "Rerun at 7ddaab0".
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from trustrl.model import transformer as M  # noqa: E402
from trustrl.model import policy  # noqa: E402
from trustrl.model.vocab_head import log_softmax_terms  # noqa: E402
from trustrl.core import losses  # noqa: E402
from trustrl.training import optim, step as ts  # noqa: E402
from trustrl.tools.aot_check import compiled_memory  # noqa: E402

GiB = 2 ** 30


def qwen3_06b(**overrides) -> M.ModelConfig:
    fields = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
                  num_heads=16, num_kv_heads=8, head_dim=128, family="qwen3",
                  rope_theta=1000000.0, tie_word_embeddings=True, param_dtype="float32",
                  dtype="bfloat16")
    return M.ModelConfig(**{**fields, **overrides})


def tiny(**overrides) -> M.ModelConfig:
    fields = {"num_layers": 3, "vocab_size": 256, **overrides}
    return M.ModelConfig.tiny(fields.pop("vocab_size"), "qwen3", param_dtype="float32",
                              dtype="bfloat16", **fields)


def loss_config(method="dppo_binary_tv"):
    return ml_collections.ConfigDict(dict(
        method=method, delta_low=0.2, delta_high=0.2, is_cap=float("inf"),
        agg="token-mean", alpha=0.1, trm_divergence="binary_tv"))


def optimizer():
    return optim.make_optimizer(ml_collections.ConfigDict(dict(
        learning_rate=1e-6, warmup_steps=10, b1=0.9, b2=0.999, weight_decay=0.1,
        grad_clip=1.0, schedule="constant", final_lr_frac=1.0)), 1)


def abstract_batch(batch: int, prompt: int, response: int) -> dict:
    """What train_step.rollout_batch builds, as shapes only."""
    t = prompt + response
    i32, f32 = jnp.int32, jnp.float32
    s = jax.ShapeDtypeStruct
    return dict(tokens=s((batch, t), i32), valid=s((batch, t), i32), positions=s((batch, t), i32),
                response_tokens=s((batch, response), i32),
                response_mask=s((batch, response), i32),
                rollout_logp=s((batch, response), f32), advantages=s((batch,), f32))


def abstract_state(cfg: M.ModelConfig, tx):
    params = M.param_shapes(cfg)
    return ts.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                         opt_state=jax.eval_shape(tx.init, params),
                         skipped=jax.ShapeDtypeStruct((), jnp.int32))


def measure_train_step(cfg: M.ModelConfig, shape, method="dppo_binary_tv",
                       fused_head=True, microbatches=1, loss_fused=True) -> dict:
    """Lowers and compiles the real train step on abstract inputs; no array is allocated.

    The exact methods (dppo_full_*) also get abstract bf16 rollout parameters (mu's hidden
    states are recomputed from them). ``fused_head=False``: the plain head (train_step's
    head="plain"); ``loss_fused=False``: the fused head with its recomputing backward
    (head="fused"); else the default, head="loss_fused".
    """
    tx = optimizer()
    roll_cfg = policy.rollout_config(cfg, "bfloat16")
    spec = losses.METHODS[method]
    roll_params = M.param_shapes(roll_cfg) if spec.divergence == "full" else None
    head = "plain" if not fused_head else "loss_fused" if loss_fused else "fused"
    step = jax.jit(functools.partial(ts.train_step, model_cfg=cfg, loss_cfg=loss_config(method),
                                     tx=tx, rollout_model_cfg=roll_cfg,
                                     microbatches=microbatches, head=head),
                   donate_argnums=(0,))
    batch = abstract_batch(*shape)
    if spec.divergence == "topk":
        b, _, n = shape
        batch.update(topk_ids=jax.ShapeDtypeStruct((b, n, 20), jnp.int32),
                     topk_logp=jax.ShapeDtypeStruct((b, n, 20), jnp.float32))
    t0 = time.perf_counter()
    compiled = step.lower(abstract_state(cfg, tx), batch, roll_params).compile()
    return dict(compiled_memory(compiled), compile_s=time.perf_counter() - t0)


def measure_head(cfg: M.ModelConfig, shape) -> dict:
    """The vocabulary head alone: lm_head + log_softmax / entropy, forward and backward."""
    b, _, n = shape
    params = M.param_shapes(cfg)
    hidden = jax.ShapeDtypeStruct((b, n, cfg.hidden_size), cfg.compute_dtype)
    targets = jax.ShapeDtypeStruct((b, n), jnp.int32)

    def loss(params, hidden, targets):
        _, logp, ent = log_softmax_terms(M.lm_head(params, cfg, hidden), targets)
        return jnp.mean(logp) + jnp.mean(ent)

    t0 = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, hidden, targets).compile()
    return dict(compiled_memory(compiled), compile_s=time.perf_counter() - t0)


# (label, ModelConfig overrides). The first row is today's path, the baseline of the ratios.
VARIANTS = (
    ("xla, unrolled, remat none (today)", dict(attention="xla", scan_layers=False, remat="none")),
    ("xla, scan, remat full", dict(attention="xla", remat="full")),
    ("blockwise, scan, remat none", dict(attention="blockwise", remat="none")),
    ("blockwise, scan, remat dots", dict(attention="blockwise", remat="dots")),
    ("blockwise, scan, remat full", dict(attention="blockwise", remat="full")),
    ("blockwise, unrolled, remat full", dict(attention="blockwise", scan_layers=False,
                                             remat="full")),
)
# ModelConfig's defaults (attention "auto", scan, remat "full") are the "blockwise, scan, remat
# full" row at both lengths on CPU (auto picks blockwise past AUTO_XLA_MAX_LEN columns).
SHAPES = {"1x16384": (1, 1024, 15360), "16x1024": (16, 512, 512)}
SMALL_SHAPES = {"4x64": (4, 32, 32), "1x256": (1, 64, 192)}


def run(make_cfg, shapes, variants=VARIANTS, log=print):
    """Prints the table; returns {shape: [(label, result dict)]}."""
    results = {}
    log("| shape | variant | temp GiB | args GiB | out GiB | total GiB | vs today | "
        "compile s | vs today |")
    log("|---|---|---|---|---|---|---|---|---|")
    for name, shape in shapes.items():
        rows = []
        for label, overrides in variants:
            rows.append((label, measure_train_step(make_cfg(**overrides), shape)))
            r, base = rows[-1][1], rows[0][1]
            log(f"| {name} | {label} | {r['temp']:.2f} | {r['args']:.2f} | {r['out']:.2f} | "
                f"{r['total']:.2f} | {base['total'] / r['total']:.2f}x | {r['compile_s']:.1f} | "
                f"{base['compile_s'] / r['compile_s']:.2f}x |")
        head = measure_head(make_cfg(), shape)
        rows.append(("head only", head))
        log(f"| {name} | head only (fwd+bwd) | {head['temp']:.2f} | {head['args']:.2f} | "
            f"{head['out']:.2f} | {head['total']:.2f} | - | {head['compile_s']:.1f} | - |")
        results[name] = rows
    return results


# Issue 12's table: ModelConfig defaults (blockwise / scan / remat full on CPU), plain vs fused
# vocabulary head, for the binary and the exact TV (the exact one also runs mu's trunk).
HEAD_METHODS = ("dppo_binary_tv", "dppo_full_tv")


def run_head(make_cfg, shapes, methods=HEAD_METHODS, log=print):
    """Prints plain / fused / loss-fused rows; returns {shape: {method: (plain, fused,
    loss_fused)}}."""
    results = {}
    log("| shape | method | head | temp GiB | args GiB | out GiB | total GiB | vs plain | "
        "compile s |")
    log("|---|---|---|---|---|---|---|---|---|")
    for name, shape in shapes.items():
        for method in methods:
            plain = measure_train_step(make_cfg(), shape, method, fused_head=False)
            fused = measure_train_step(make_cfg(), shape, method, loss_fused=False)
            lfused = measure_train_step(make_cfg(), shape, method)
            for label, r in (("plain", plain), ("fused", fused), ("loss-fused", lfused)):
                log(f"| {name} | {method} | {label} | {r['temp']:.2f} | {r['args']:.2f} | "
                    f"{r['out']:.2f} | {r['total']:.2f} | {plain['total'] / r['total']:.2f}x | "
                    f"{r['compile_s']:.1f} |")
            results.setdefault(name, {})[method] = (plain, fused, lfused)
    return results


# train.microbatches: gradient accumulation inside the step (defaults, dppo_binary_tv).
MICROBATCHES = (1, 8, 32)
MICRO_SHAPES = {"16x1024": (16, 512, 512), "128x1024": (128, 512, 512)}
SMALL_MICROBATCHES = (1, 4)


def run_micro(make_cfg, shapes, counts=MICROBATCHES, log=print):
    """Prints one row per micro-batch count; returns {shape: {count: result}}."""
    results = {}
    log("| shape | microbatches | temp GiB | args GiB | out GiB | total GiB | vs 1 | compile s |")
    log("|---|---|---|---|---|---|---|---|")
    for name, shape in shapes.items():
        for n in counts:
            if shape[0] % n:
                continue
            r = measure_train_step(make_cfg(), shape, microbatches=n)
            base = results.setdefault(name, {}).setdefault(1, r)
            results[name][n] = r
            log(f"| {name} | {n} | {r['temp']:.2f} | {r['args']:.2f} | {r['out']:.2f} | "
                f"{r['total']:.2f} | {base['total'] / r['total']:.2f}x | {r['compile_s']:.1f} |")
    return results


TABLES = ("head", "layers", "micro")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny model and lengths (seconds)")
    p.add_argument("--only", default="", help=f"one shape of {sorted(SHAPES)}")
    p.add_argument("--tables", default="head,layers",
                   help=f"comma-separated subset of {TABLES}: head = plain vs fused vocabulary "
                        "head (defaults), layers = attention backend x remat x scan, micro = "
                        "train.microbatches (gradient accumulation)")
    args = p.parse_args(argv)
    shapes = SMALL_SHAPES if args.small else SHAPES
    if args.only:
        if args.only not in shapes:
            raise SystemExit(f"--only={args.only!r}: valid: {sorted(shapes)}")
        shapes = {args.only: shapes[args.only]}
    tables = [t for t in args.tables.split(",") if t]
    if not tables or any(t not in TABLES for t in tables):
        raise SystemExit(f"--tables={args.tables!r}: valid: comma-separated subset of {TABLES}")
    make_cfg = tiny if args.small else qwen3_06b
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
          f"{len(jax.devices())} device(s); model {'tiny' if args.small else 'Qwen3-0.6B'}",
          flush=True)
    log = lambda s: print(s, flush=True)
    out = {}
    if "head" in tables:
        out["head"] = run_head(make_cfg, shapes, log=log)
    if "layers" in tables:
        out["layers"] = run(make_cfg, shapes, log=log)
    if "micro" in tables:
        micro_shapes = shapes if args.small or args.only else MICRO_SHAPES
        out["micro"] = run_micro(make_cfg, micro_shapes,
                                 SMALL_MICROBATCHES if args.small else MICROBATCHES, log=log)
    return out


if __name__ == "__main__":
    main()
