"""LoRA adapters (Hu et al. 2021) on the decoder's projections, in PEFT's conventions.

A target projection ``y = x @ W`` (W [*in, *out], a ``transformer._kernel``) becomes

    y = x @ W + (alpha / rank) * (x @ A) @ B          A [*in, rank], B [rank, *out]

computed unmerged in the trainer (no [*in, *out] product is ever formed, and W gets no
gradient) and merged, ``W + (alpha / rank) A @ B``, for the rollout engine (``merge``, once per
iteration). A is initialised as PEFT's ``init_lora_weights=True`` (kaiming-uniform with
a = sqrt(5): U(-1 / sqrt(fan_in), 1 / sqrt(fan_in)), fan_in = prod(*in)) or ``"gaussian"``
(N(0, 1 / rank)); B is zero, so an untrained adapter leaves the model's outputs bitwise
unchanged.

Parameter layout: the adapters are leaves of the model's parameter tree next to their kernel,
``<kernel>_lora_a`` / ``<kernel>_lora_b`` (``ModelConfig.lora_rank`` > 0 creates them), in
float32 whatever the base's storage dtype, with the kernel's logical axes on their kernel-side
dimensions (so they shard like the kernel) and none on the rank. ``split`` separates a tree
into (frozen base, adapters) and ``combine`` puts them back together; both are dict
operations, no array is copied. The train step differentiates only the adapters.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from trustrl.model import quant

# the projections an adapter can target (PEFT's module names for Llama / Qwen2 / Qwen3);
# value: number of leading input axes of trustrl's kernel (as quant.KERNELS)
TARGETS = dict(quant.KERNELS)
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
# a mixture of experts' expert weights [X, in, out] -> the target that adapts them (one
# adapter per expert: moe.Adapted), as PEFT's gate_proj / up_proj / down_proj match every
# expert's projections of a transformers Qwen3-MoE
EXPERT_TARGETS = {"expert_gate": "gate_proj", "expert_up": "up_proj", "expert_down": "down_proj"}
INITS = ("kaiming", "gaussian")  # PEFT's init_lora_weights True / "gaussian"
A_SUFFIX, B_SUFFIX = "_lora_a", "_lora_b"


def is_adapter(name: str) -> bool:
    return name.endswith(A_SUFFIX) or name.endswith(B_SUFFIX)


def check_config(rank: int, alpha: float, targets, init: str):
    """ValueError naming the field (model.lora.*) and the valid choices. The MLP targets adapt
    a mixture of experts' experts too (one adapter per expert)."""
    if int(rank) < 1:
        raise ValueError(f"model.lora.rank={rank} must be >= 1 (0 turns LoRA off: leave "
                         f"model.lora.rank unset / 0 and model.lora.targets empty)")
    if not float(alpha) > 0:
        raise ValueError(f"model.lora.alpha={alpha} must be > 0 (PEFT scales the adapter by "
                         f"alpha / rank)")
    if not targets:
        raise ValueError(f"model.lora.targets is empty; choose some of {tuple(TARGETS)}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"model.lora.targets has unknown projections {unknown}; valid: "
                         f"{tuple(TARGETS)} (on the command line a tuple of quoted names: "
                         f"--config.model.lora.targets=\"('q_proj', 'v_proj')\")")
    if len(set(targets)) != len(targets):
        raise ValueError(f"model.lora.targets={tuple(targets)} names a projection twice")
    if init not in INITS:
        raise ValueError(f"model.lora.init={init!r} is not valid; choose one of {INITS}")


def adapts_experts(config) -> bool:
    """Whether a LoRA model has adapters on a mixture of experts' experts (an MLP target and
    a sparse layer)."""
    return bool(config.lora_rank and config.sparse_layers
                and any(t in MLP_TARGETS for t in config.lora_targets))


def scale(config) -> float:
    """The adapter's multiplier alpha / rank (PEFT's ``scaling``, use_rslora off)."""
    return float(config.lora_alpha) / int(config.lora_rank)


def init_a(init: str, rank: int, in_shape):
    """A's initializer: PEFT's kaiming-uniform (a = sqrt(5)) or gaussian (std 1 / rank)."""
    fan_in = math.prod(in_shape)
    if init == "gaussian":
        return lambda key, shape, dtype: jax.random.normal(key, shape, dtype) / rank
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def split(tree):
    """(base, adapters): the tree without its ``*_lora_a`` / ``*_lora_b`` leaves, and only
    those (with the same nesting; empty dicts dropped). Works on any tree of params' layout:
    arrays, shardings, ShapeDtypeStructs, logical axes."""
    base, adapters = {}, {}
    for name, value in tree.items():
        if isinstance(value, dict):
            b, a = split(value)
            if b:
                base[name] = b
            if a:
                adapters[name] = a
        elif is_adapter(name):
            adapters[name] = value
        else:
            base[name] = value
    return base, adapters


def combine(base, adapters):
    """The inverse of ``split``: one tree with both (a dict merge; arrays are not copied)."""
    out = dict(base)
    for name, value in adapters.items():
        out[name] = combine(out.get(name, {}), value) if isinstance(value, dict) else value
    return out


def base_config(config):
    """The model without adapters (the merged model's config, what the rollout engine runs)."""
    return dataclasses.replace(config, lora_rank=0, lora_alpha=0.0, lora_targets=())


def merged_config(config):
    """The config ``merge`` produces: without adapters nor weight_quant for a LoRA model,
    ``config`` itself otherwise."""
    if not config.lora_rank:
        return config
    return dataclasses.replace(base_config(config), weight_quant="")


def delta(a, b, s: float, lead: int = 0):
    """s * A @ B as a kernel [*lead, *in, *out] float32; A [*lead, *in, r], B [*lead, r, *out]."""
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    lead_shape, in_shape = a32.shape[:lead], a32.shape[lead:-1]
    out_shape = b32.shape[lead + 1:]
    r = a32.shape[-1]
    m = jnp.matmul(a32.reshape(*lead_shape, -1, r), b32.reshape(*lead_shape, r, -1),
                   precision=jax.lax.Precision.HIGHEST)
    return (s * m).reshape(*lead_shape, *in_shape, *out_shape)


def merge(params, config, dtype=None):
    """(merged params, merged config): every adapted kernel replaced by ``W + s A @ B`` (in
    float32, W dequantised first under ``weight_quant``), stored in ``dtype`` (default: the
    config's param_dtype) and the adapters dropped; the config without LoRA and without
    weight_quant (a quantised base is merged to float weights; ``policy.cast_params`` may
    quantise them again for the rollout). Jit it (``jax.jit(merge, static_argnums=(1, 2))``):
    one program that writes only the merged kernels."""
    s = scale(config)
    dtype = jnp.dtype(dtype or config.param_dtype)
    quantized = bool(config.weight_quant)

    def walk(tree, stacked):
        out = {}
        for name, value in tree.items():
            if isinstance(value, dict):
                out[name] = walk(value, stacked or (config.scan_layers and name == "layers"))
            elif is_adapter(name) or (quantized and name.endswith(quant.SCALE_SUFFIX)
                                      and name[:-len(quant.SCALE_SUFFIX)] in quant.KERNELS):
                continue
            else:
                out[name] = kernel(tree, name, value, stacked)
        return out

    def kernel(tree, name, value, stacked):
        """A leaf as merged: an adapted kernel (experts' too: [(L,) X, in, out]) or a quantised
        one in float32 (dequantised, plus s A @ B), then ``dtype``; any other leaf as is."""
        adapted = name + A_SUFFIX in tree and (name in TARGETS or name in EXPERT_TARGETS)
        dequant = quantized and name in quant.KERNELS and name + quant.SCALE_SUFFIX in tree
        if not (adapted or dequant):
            return value
        lead = int(stacked) + (name in EXPERT_TARGETS)
        w = (quant.dequantize(value, tree[name + quant.SCALE_SUFFIX], quant.KERNELS[name],
                              jnp.float32, lead=lead) if dequant
             else jnp.asarray(value, jnp.float32))
        if adapted:
            w = w + delta(tree[name + A_SUFFIX], tree[name + B_SUFFIX], s, lead)
        return w.astype(dtype)

    return walk(params, False), merged_config(config)


def num_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
