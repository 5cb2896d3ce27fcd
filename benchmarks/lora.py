"""LoRA vs full fine-tuning (issue 29's goals): the compiled train step's memory at Qwen3
shapes, the CPU train-step time, the per-iteration merge and the decode step merged vs unmerged.

Run:
    python benchmarks/lora.py               # everything below, ~10-15 minutes on 2 CPU cores
    python benchmarks/lora.py --parts=time  # one part: memory, time, merge, decode
    python benchmarks/lora.py --quick       # tiny shapes, seconds (tests/test_benchmarks.py)

Every program is built by the functions the run uses (trustrl.training.experiment:
with_lora, train_step_program, rollout_params_program; step.state_shardings /
abstract_state; policy.decode_model), on a one-device CPU mesh:

  memory  XLA's memory analysis of the compiled train step (jit(...).lower(abstract
          arguments).compile(): jax.ShapeDtypeStructs, no weight is materialised) for the
          Qwen3-0.6B and Qwen3-8B shapes (trustrl.tools.aot_check.MODELS) at 16 x (512 + 512)
          and 1 x (1,024 + 15,360) tokens, one micro-batch, bf16 compute, remat, DPPO-Binary-TV:
            full       fp32 master weights + AdamW moments for every parameter (the state is
                       donated: arguments and outputs alias);
            LoRA bf16  r 32, alpha 64 on all 7 projections, adapters + moments in fp32, the
                       frozen base in bf16 as the step's 4th argument;
            LoRA int8  the same on an int8 base (model.lora.base_quant="int8": per-channel
                       scales, bf16 embeddings / norms).
          "sum" = arguments + outputs + temporaries (the issue's total), "net" = sum - aliased
          (donated) bytes, what the program needs at once (aot_check's "total"). The step's
          rollout-params argument is not read by DPPO-Binary-TV and jit drops it.
          Frozen-weight gradients: dot_general results in the step's jaxpr (every nested
          jaxpr: scan, remat, custom VJPs) shaped like a base weight (a layer's kernel, the
          embedding or head, up to the order of the dimensions): a weight gradient is; and
          the dots / matmul calls of that shape in the compiled HLO (after XLA's dead-code
          elimination). The full step has them (the control), the LoRA step must have none.
  time    the train step's wall time, LoRA vs full, on a CPU model shaped like
          configs/default.py's but d = 256 (4 layers, 8 heads of 32, 4 KV heads, SwiGLU 768,
          vocabulary 512, tied), 16 rows x (64 + 192) tokens, fp32 (the CPU configs' dtypes),
          best of --repeats interleaved calls in one process after a warm-up.
  merge   experiment.rollout_params_program once (the adapters merged into the frozen base and
          cast to the rollout dtype, one jit, what the loop runs every iteration) vs the full
          run's cast of its fp32 master weights, for that CPU model (fp32 base -> bf16) and
          Qwen3-0.6B (bf16 base -> bf16).
  decode  one decode step (transformer.decode_step, what the sampler's loop calls per token;
          jitted, KV cache after a 64-token prefill) on the merged weights vs the unmerged
          LoRA model (the adapters' two small matmuls per projection), rollout dtype bf16.

Measured 2026-12-06 on this repository's CPU VM (2 cores of an AMD EPYC, 23 GiB, jax 0.10.2,
shared with other sessions, load average 6-14); `python benchmarks/lora.py --parts memory` and
`--parts time,merge,decode --repeats 7` (docs/lora_performance.md has every row and the why):

    memory, GiB (sum = args + out + temp; x full; rerun 2026-12-07 16:32 at 7ddaab0, after
    transformer.bits_residual; at bdb7f8a, after loop_storage, 0.6B was 20.87 / 6.76 / 5.53
    and 8B LoRA 47.77-48.04 / 28.49-28.64; before loop_storage LoRA bf16 7.58 / 60.83 / 60.98)
                                                   full     LoRA bf16        LoRA int8
    Qwen3-0.6B 16 x (512 + 512)                    20.00    5.86 (0.293x)    4.63 (0.231x)
    Qwen3-0.6B 1 x (1,024 + 15,360)                19.99    5.85 (0.293x)    4.63 (0.231x)
    Qwen3-8B   16 x (512 + 512)                   252.51   43.52 (0.172x)   24.12 (0.096x)
    Qwen3-8B   1 x (1,024 + 15,360)               252.51   43.54 (0.172x)   24.14 (0.096x)
    weight-shaped dots, jaxpr / compiled HLO: full 9 / 9, LoRA 2 / 0 (the fused vocab head's
    dW in the jaxpr, removed by XLA)

    train step, CPU model, fp32      full       LoRA r16         LoRA r32
    16 x (64 + 192) tokens          8,380 ms   8,884 (1.06x)    7,823 (0.93x)
    8 x (32 + 96) (--time_batch)    1,036 ms   1,048 (1.01x)    1,083 (1.05x)
    --time_model=qwen3-0.6b-width (2026-12-07, db0d694, idle VM, --repeats 3)
    16 x (64 + 192) tokens          5,795 ms   4,747 (0.82x)    4,815 (0.83x)
    --time_model=qwen3-8b-width --time_batch 8,32,96 (2026-12-07, 7ddaab0, two study runs
    beside it; --repeats 3, then 5)
    8 x (32 + 96) tokens           15,484 ms  11,396 (0.74x)   10,100 (0.65x)
                                   18,417 ms  11,559 (0.63x)   11,708 (0.64x)
    (LoRA / full ~ 0.75 + r (d_in + d_out) / (d_in d_out) with full remat: <= 0.8x needs
    d >~ 1,280 at r 32; docs/lora_performance.md section 2)

    rollout params per iteration    CPU model: cast 1.4 ms, merge + cast 7.8 ms;
                                    Qwen3-0.6B: cast 2,291 ms, merge + cast (bf16 base) 5,777 ms
    decode step (16 rows, bf16)     merged 4.42 ms, unmerged LoRA 5.54 ms (1.25x)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402
from configs import default  # noqa: E402
from trustrl.infra import sharding  # noqa: E402
from trustrl.model import hf, lora, policy  # noqa: E402
from trustrl.model import transformer as model_lib  # noqa: E402
from trustrl.tools import aot_check  # noqa: E402
from trustrl.training import experiment, step as ts  # noqa: E402

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GiB = 2 ** 30
# (model preset, rows, prompt tokens, response tokens): the memory shapes
MEMORY = [(m, r, p, n) for m in ("qwen3-0.6b", "qwen3-8b")
          for r, p, n in ((16, 512, 512), (1, 1024, 15360))]
# (name, model.param_dtype, LoRA (r 32, alpha 64), model.lora.base_quant)
VARIANTS = (("full", "float32", False, ""), ("LoRA bf16", "bfloat16", True, ""),
            ("LoRA int8", "bfloat16", True, "int8"))
# the CPU model (configs/default.py's layout at d = 256) and its batch
SMALL = dict(num_layers=4, hidden_size=256, intermediate_size=768, num_heads=8, num_kv_heads=4,
             head_dim=32)
SMALL_VOCAB, SMALL_BATCH = 512, (16, 64, 192)
# --time_model: the time part's model layouts (vocabulary SMALL_VOCAB); "qwen3-0.6b-width" is two
# layers of Qwen3-0.6B's width (hidden 1,024, SwiGLU 3,072, 16 heads / 8 KV heads of 128),
# "qwen3-8b-width" one layer of Qwen3-8B's (hidden 4,096, SwiGLU 12,288, 32 / 8 heads of 128)
TIME_MODELS = {"cpu": SMALL,
               "qwen3-0.6b-width": dict(num_layers=2, hidden_size=1024, intermediate_size=3072,
                                        num_heads=16, num_kv_heads=8, head_dim=128),
               "qwen3-8b-width": dict(num_layers=1, hidden_size=4096, intermediate_size=12288,
                                      num_heads=32, num_kv_heads=8, head_dim=128)}
QUICK_MODEL = dict(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4,
                   num_kv_heads=2, head_dim=8)
QUICK_VOCAB, QUICK_BATCH = 64, (4, 8, 8)
# a tiny Qwen3 for --quick's memory rows (LoRA r 8); no token count (2 x (8 + 14)) or rank equals a
# weight's dimension, so the weight-shaped dots are weight gradients
QUICK_QWEN3 = dict(aot_check.MODELS["qwen3-0.6b"], num_hidden_layers=2, hidden_size=40,
                   intermediate_size=72, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=10, vocab_size=200)


class _EosOnly:
    eos_id = 0


def run_config(rows: int, prompt_len: int, new: int, *, param_dtype="float32", dtype="float32",
               remat=False, rank=0, alpha=0.0, base_quant="", model=None):
    """A one-device run config training ``rows`` x (prompt_len + new) tokens in one micro-batch
    (configs/default.py's, DPPO-Binary-TV), with LoRA r ``rank`` on all projections."""
    c = default.get_config("default")
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.model.param_dtype, c.model.dtype, c.model.remat = param_dtype, dtype, remat
    if model:
        c.model.update(model)
    c.rollout.prompts_per_iter, c.rollout.group_size = 1, rows
    c.rollout.max_new_tokens = new
    c.rollout.max_rows = 0
    c.train.minibatches = c.train.microbatches = 1
    c.loss.method = "dppo_binary_tv"
    if rank:
        c.model.lora.rank, c.model.lora.alpha = rank, alpha or 2.0 * rank
        c.model.lora.targets, c.model.lora.base_quant = ALL, base_quant
    return c


class Built:
    """A run's train step and its (abstract or concrete) arguments (a plain class: the tests
    load this file without registering it as a module, which dataclasses need)."""
    def __init__(self, cfg, model_cfg, roll_cfg, mesh, step, state, batch, roll_params,
                 frozen):
        self.cfg, self.model_cfg, self.roll_cfg, self.mesh = cfg, model_cfg, roll_cfg, mesh
        self.step, self.state, self.batch = step, state, batch
        self.roll_params, self.frozen = roll_params, frozen


def build(cfg, model_cfg, prompt_len: int, devices, *, concrete: bool = False, seed: int = 0):
    """The run's train step for cfg (experiment.train_step_program) with abstract arguments
    (aot_check's way) or, ``concrete``, random weights and a random batch."""
    mesh = sharding.make_mesh(cfg.mesh, devices=devices)
    model_cfg = experiment.with_lora(cfg, experiment.with_run_fields(cfg, model_cfg))
    roll_cfg = policy.rollout_config(lora.merged_config(model_cfg), cfg.rollout.dtype,
                                     cfg.rollout.head_dtype)
    tx = experiment.optimizer(cfg)
    state_sh = ts.state_shardings(model_cfg, tx, mesh)
    sampler = experiment.samplers(cfg, _EosOnly(), roll_cfg, mesh)[0]
    rows = cfg.rollout.prompts_per_iter * cfg.rollout.group_size
    batch = experiment.batch_spec(cfg, sampler.cfg, rows, prompt_len, mesh, old_logp=True,
                                  model_cfg=model_cfg)
    step = experiment.train_step_program(cfg, model_cfg, roll_cfg, tx, state_sh, mesh)
    if not concrete:
        full = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            model_lib.param_shapes(model_cfg),
                            model_lib.param_shardings(model_cfg, mesh))
        frozen, params = lora.split(full) if model_cfg.lora_rank else (None, full)
        roll = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            model_lib.param_shapes(roll_cfg),
                            model_lib.param_shardings(roll_cfg, mesh))
        return Built(cfg, model_cfg, roll_cfg, mesh, step,
                     ts.abstract_state(params, tx, state_sh), batch, roll, frozen)
    key = jax.random.key(seed)
    base_cfg = lora.base_config(dataclasses.replace(model_cfg, weight_quant=""))
    params = model_lib.init_params(base_cfg, key, mesh)
    frozen = None
    if model_cfg.lora_rank:
        frozen, params = experiment.lora_params(cfg, model_cfg, params,
                                                jax.random.fold_in(key, 1), mesh)
        # a trained adapter: B != 0 (the merge and the decode path then do real work)
        params = jax.tree.map(lambda x: x + 0.01, params)
    state = ts.init_program(tx, state_sh)(params)
    roll = experiment.rollout_params_program(model_cfg, roll_cfg, frozen)(state.params)
    return Built(cfg, model_cfg, roll_cfg, mesh, step, state,
                 random_batch(batch, prompt_len, model_cfg.vocab_size, seed), roll, frozen)


def random_batch(spec: dict, prompt_len: int, vocab: int, seed: int = 0) -> dict:
    """Arrays of ``spec``'s shapes and shardings: random tokens, every token valid, mu's and
    pi_old's log-probs near each other, random advantages."""
    rng = np.random.default_rng(seed)
    rows, t = spec["tokens"].shape
    tokens = rng.integers(0, vocab, (rows, t)).astype(np.int32)
    mu = -rng.uniform(0.05, 3.0, (rows, t - prompt_len)).astype(np.float32)
    arrays = dict(tokens=tokens, valid=np.ones((rows, t), np.int32),
                  positions=np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)),
                  response_tokens=tokens[:, prompt_len:],
                  response_mask=np.ones((rows, t - prompt_len), np.int32), rollout_logp=mu,
                  old_logp=mu + rng.normal(0, 0.05, mu.shape).astype(np.float32),
                  advantages=rng.normal(0, 1, (rows,)).astype(np.float32))
    return {k: jax.device_put(arrays[k], s.sharding) for k, s in spec.items()}


def args(b: Built) -> tuple:
    return (b.state, b.batch, b.roll_params) + ((b.frozen,) if b.frozen is not None else ())


# ----------------------------------------------------------------------------------- memory

def dot_outputs(jaxpr) -> list:
    """Shapes of every dot_general result in a (closed) jaxpr and the jaxprs nested in it."""
    out = []
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        if eqn.primitive.name == "dot_general":
            out.append(tuple(eqn.outvars[0].aval.shape))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    out += dot_outputs(sub)
    return out


def weight_shapes(model_cfg) -> set:
    """The base's weights as one layer (or the embedding / head) holds them, each as its sorted
    dimensions and as its [in, out] matrix (a projection's kernel [*in, *out]): the shapes a
    weight gradient's dot_general can produce (its result is a permutation of them). Norms
    (1-D) left out."""
    shapes = set()
    base = lora.split(model_lib.param_shapes(lora.base_config(
        dataclasses.replace(model_cfg, weight_quant=""))))[0]
    for path, x in jax.tree_util.tree_leaves_with_path(base):
        stacked = model_cfg.scan_layers and any(getattr(k, "key", None) == "layers"
                                                for k in path)
        shape = x.shape[1:] if stacked else x.shape
        if len(shape) >= 2:
            shapes.add(tuple(sorted(shape)))
            n_in = lora.TARGETS.get(getattr(path[-1], "key", ""), 1)
            shapes.add(tuple(sorted((int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:]))))))
    return shapes


def weight_gradients(b: Built, compiled) -> tuple[list, list]:
    """(dot_general results in the train step's jaxpr, dots / matmul calls in its compiled
    HLO) shaped like a base weight (``weight_shapes``)."""
    shapes = weight_shapes(b.model_cfg)
    jaxpr = [s for s in dot_outputs(jax.make_jaxpr(b.step)(*args(b)))
             if tuple(sorted(s)) in shapes]
    hlo = []
    for line in compiled.as_text().splitlines():
        m = re.search(r"= \w+\[([\d,]*)\]\S* (dot\(|custom-call\(.*matmul)", line)
        if m and m.group(1):
            shape = tuple(int(d) for d in m.group(1).split(","))
            if tuple(sorted(shape)) in shapes:
                hlo.append(shape)
    return jaxpr, hlo


def memory_rows(shapes, devices, rank: int = 32, log=print) -> list:
    """One row per (model, shape, variant): bytes of the compiled train step."""
    rows = []
    for model, n_rows, prompt, new in shapes:
        hf_config = aot_check.MODELS[model] if isinstance(model, str) else model
        name = model if isinstance(model, str) else "quick"
        for variant, param_dtype, lora_on, quant in VARIANTS:
            cfg = run_config(n_rows, prompt, new, param_dtype=param_dtype, dtype="bfloat16",
                             remat=True, rank=rank if lora_on else 0, alpha=2.0 * rank,
                             base_quant=quant)
            model_cfg = hf.config_from_hf(hf_config, param_dtype=param_dtype, dtype="bfloat16",
                                          remat=True)
            t0 = time.perf_counter()
            b = build(cfg, model_cfg, prompt, devices)
            with jax.set_mesh(b.mesh):  # as the run traces ("auto" kernels resolve for it)
                compiled = b.step.lower(*args(b)).compile()
                m = compiled.memory_analysis()
                jaxpr_grads, hlo_grads = weight_gradients(b, compiled)
            total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            row = dict(model=name, shape=f"{n_rows} x ({prompt} + {new})", variant=variant,
                       args=m.argument_size_in_bytes, out=m.output_size_in_bytes,
                       temp=m.temp_size_in_bytes, alias=m.alias_size_in_bytes, sum=total,
                       net=total - m.alias_size_in_bytes, jaxpr_weight_dots=len(jaxpr_grads),
                       hlo_weight_dots=len(hlo_grads),
                       seconds=time.perf_counter() - t0)
            rows.append(row)
            log(f"  {name} {row['shape']} {variant}: args {row['args'] / GiB:.2f} out "
                f"{row['out'] / GiB:.2f} temp {row['temp'] / GiB:.2f} GiB, sum "
                f"{total / GiB:.2f}, net {row['net'] / GiB:.2f}; weight-shaped dots: jaxpr "
                f"{len(jaxpr_grads)} {sorted(set(jaxpr_grads))}, compiled "
                f"{len(hlo_grads)} {sorted(set(hlo_grads))} ({row['seconds']:.0f} s)")
    for r in rows:
        full = next(f for f in rows if f["model"] == r["model"] and f["shape"] == r["shape"]
                    and f["variant"] == "full")
        r["ratio_sum"], r["ratio_net"] = r["sum"] / full["sum"], r["net"] / full["net"]
    return rows


def print_memory(rows):
    print("| model | tokens | step | args | out | temp | sum GiB | x full | net GiB | x full "
          "| weight-shaped dots: jaxpr / compiled |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        g = lambda k: f"{r[k] / GiB:.2f}"
        print(f"| {r['model']} | {r['shape']} | {r['variant']} | {g('args')} | {g('out')} | "
              f"{g('temp')} | {g('sum')} | {r['ratio_sum']:.3f} | {g('net')} | "
              f"{r['ratio_net']:.3f} | {r['jaxpr_weight_dots']} / {r['hlo_weight_dots']} |")


# ------------------------------------------------------------------------- time, merge, decode

def small_model(quick: bool, param_dtype="float32", dtype="float32", layout=None):
    layout, vocab = (QUICK_MODEL, QUICK_VOCAB) if quick else (layout or SMALL, SMALL_VOCAB)
    c = default.get_config("default")
    c.model.update(layout, param_dtype=param_dtype, dtype=dtype)
    return experiment.model_config(c, vocab), layout


def time_rows(quick: bool, devices, repeats: int, ranks=(16, 32), batch=None,
              model: str = "cpu") -> list:
    """Train-step seconds, full vs LoRA r in ``ranks`` (alpha 2r, all projections), fp32, on
    the ``TIME_MODELS[model]`` layout."""
    model_cfg, layout = small_model(quick, layout=TIME_MODELS[model])
    rows, prompt, new = batch or (QUICK_BATCH if quick else SMALL_BATCH)
    built = {"full": build(run_config(rows, prompt, new, model=layout), model_cfg, prompt,
                           devices, concrete=True)}
    for r in ranks:
        built[f"LoRA r{r}"] = build(run_config(rows, prompt, new, model=layout, rank=r),
                                    model_cfg, prompt, devices, concrete=True)

    def runner(b):
        def call():
            b.state, metrics = b.step(*args(b))
            return metrics
        return call

    best, _ = bench_common.best_of({k: runner(b) for k, b in built.items()}, repeats)
    n = lambda b: lora.num_params(b.state.params)
    return [dict(variant=k, ms=s * 1e3, ratio=s / best["full"], trained=n(built[k]),
                 tokens=rows * (prompt + new)) for k, s in best.items()]


def merge_rows(quick: bool, devices, repeats: int, with_06b: bool) -> list:
    """Seconds of one rollout_params_program call: LoRA merge + cast vs the full run's cast."""
    out = []
    model_cfg, layout = small_model(quick)
    shapes = [(f"CPU model ({model_cfg.num_layers}L, d={model_cfg.hidden_size})", model_cfg,
               layout, "float32")]
    if with_06b:
        shapes.append(("Qwen3-0.6B", hf.config_from_hf(aot_check.MODELS["qwen3-0.6b"]), None,
                       "bfloat16"))
    for name, base_cfg, layout, base_dtype in shapes:
        mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=devices)
        runs, keep = {}, []
        for variant, rank, param_dtype in (("full: cast", 0, "float32"),
                                           ("LoRA r32: merge + cast", 32, base_dtype)):
            cfg = run_config(1, 8, 8, param_dtype=param_dtype, rank=rank, model=layout)
            cfg.rollout.dtype = "bfloat16"
            mc = experiment.with_lora(cfg, dataclasses.replace(base_cfg,
                                                               param_dtype=param_dtype))
            roll_cfg = policy.rollout_config(lora.merged_config(mc), "bfloat16")
            params = model_lib.init_params(lora.base_config(mc), jax.random.key(0), mesh)
            frozen = None
            if rank:
                frozen, params = experiment.lora_params(cfg, mc, params, jax.random.key(1), mesh)
            program = experiment.rollout_params_program(mc, roll_cfg, frozen)
            keep.append((params, frozen))
            runs[variant] = (lambda program, params: lambda: program(params))(program, params)
        best, _ = bench_common.best_of(runs, repeats)
        for variant, s in best.items():
            out.append(dict(model=name, variant=variant, ms=s * 1e3,
                            base=base_dtype if "LoRA" in variant else "float32"))
        del keep, runs
    return out


def decode_rows(quick: bool, devices, repeats: int, rows: int = 16, prefill: int = 64) -> list:
    """One decode step's seconds on the merged weights vs the unmerged LoRA model (bf16)."""
    model_cfg, layout = small_model(quick)
    cfg = run_config(1, 8, 8, rank=32, model=layout)
    mesh = sharding.make_mesh(cfg.mesh, devices=devices)
    mc = experiment.with_lora(cfg, model_cfg)
    key = jax.random.key(0)
    frozen, adapters = experiment.lora_params(
        cfg, mc, model_lib.init_params(lora.base_config(mc), key, mesh), key, mesh)
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)
    merged_cfg = policy.rollout_config(lora.merged_config(mc), "bfloat16")
    unmerged_cfg = policy.rollout_config(mc, "bfloat16")
    variants = {
        "merged": (merged_cfg, experiment.rollout_params_program(mc, merged_cfg, frozen)(
            adapters)),
        "unmerged LoRA": (unmerged_cfg, policy.cast_params(lora.combine(frozen, adapters),
                                                           unmerged_cfg))}
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, mc.vocab_size, (rows, prefill)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(prefill, dtype=jnp.int32), (rows, prefill))
    runs = {}
    for name, (c, p) in variants.items():
        cache = model_lib.init_cache(c, rows, prefill + 64)
        _, cache = jax.jit(lambda p, t, pos, v, cache, c=c: model_lib.prefill(
            p, c, t, pos, v, cache))(p, tokens, positions, jnp.ones_like(tokens, bool), cache)
        step = jax.jit(lambda p, t, pos, cache, c=c: model_lib.decode_step(p, c, t, pos, cache))
        runs[name] = (lambda step, p, cache: lambda: step(
            p, tokens[:, -1], positions[:, -1] + 1, cache))(step, p, cache)
    best, outs = bench_common.best_of(runs, repeats)
    diff = float(jnp.max(jnp.abs(outs["merged"][0] - outs["unmerged LoRA"][0])))
    return [dict(variant=k, ms=s * 1e3, ratio=s / best["merged"], rows=rows,
                 cache=prefill + 64, max_logit_diff=diff) for k, s in best.items()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (the smoke test)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--parts", default="memory,time,merge,decode")
    p.add_argument("--time_batch", default="", help="time: ROWS,PROMPT,NEW (default "
                   f"{','.join(map(str, SMALL_BATCH))})")
    p.add_argument("--time_model", default="cpu", choices=tuple(TIME_MODELS),
                   help="time: the model layout (cpu: the d = 256 CPU model)")
    p.add_argument("--models", default="qwen3-0.6b,qwen3-8b", help="memory: model presets")
    p.add_argument("--topology", default="", help="memory: compile for one chip of this TPU "
                   "topology (e.g. v5p:1x1x1; libtpu's compile-only devices, as aot_check) "
                   "instead of the CPU")
    a = p.parse_args(argv)
    parts = a.parts.split(",")
    devices = jax.devices("cpu")[:1]
    if a.topology:
        from jax.experimental import topologies
        devices = topologies.get_topology_desc(a.topology, "tpu").devices[:1]
    print(f"jax {jax.__version__} on {devices[0].device_kind} ({os.cpu_count()} CPUs), one "
          f"device; {time.strftime('%Y-%m-%d %H:%M')}")
    out = {}
    if "memory" in parts:
        shapes = ([(QUICK_QWEN3, 2, 8, 14)] if a.quick else
                  [s for s in MEMORY if s[0] in a.models.split(",")])
        out["memory"] = rows = memory_rows(shapes, devices, rank=8 if a.quick else 32)
        print_memory(rows)
    if "time" in parts:
        out["time"] = rows = time_rows(
            a.quick, devices, a.repeats, ranks=(32,) if a.quick else (16, 32),
            batch=tuple(int(x) for x in a.time_batch.split(",")) if a.time_batch else None,
            model=a.time_model)
        r0 = rows[0]
        print(f"train step, {a.time_model} model, {r0['tokens']} tokens, fp32, best of "
              f"{a.repeats}:")
        print("| step | trained parameters | ms | x full |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['variant']} | {r['trained']:,} | {r['ms']:.1f} | {r['ratio']:.2f}x |")
    if "merge" in parts:
        out["merge"] = rows = merge_rows(a.quick, devices, a.repeats, with_06b=not a.quick)
        print(f"rollout params per iteration (jitted), best of {a.repeats}:")
        print("| model | program | base | ms |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['variant']} | {r['base']} | {r['ms']:.1f} |")
    if "decode" in parts:
        out["decode"] = rows = decode_rows(a.quick, devices, a.repeats)
        print(f"decode step, {rows[0]['rows']} rows, cache {rows[0]['cache']}, bf16, best of "
              f"{a.repeats} (max |logit diff| {rows[0]['max_logit_diff']:.3g}):")
        print("| weights | ms | x merged |\n|---|---|---|")
        for r in rows:
            print(f"| {r['variant']} | {r['ms']:.2f} | {r['ratio']:.2f}x |")
    return out


if __name__ == "__main__":
    main()
