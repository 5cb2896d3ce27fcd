"""Weight-only quantisation of the rollout policy: int8, fp8 (e4m3) or int4 weights, bf16
activations.

Quantised rollout engines (8-bit weights for the sampler, full precision in the trainer) are a
real and large source of training-inference mismatch, created on purpose for rollout speed.
trustrl reproduces their numerics: ``policy.rollout_config(cfg, "int8" | "fp8")`` sets
``ModelConfig.weight_quant``, ``policy.cast_params`` quantises the trunk's matmul kernels, and the
model dequantises each kernel where it is used (``w = q * scale`` in float32, rounded to the bf16
compute dtype), so the rollout runs the quantised weights with bf16 activations. The trainer,
the Rollout record and the mismatch metrics do not change.

Scheme (per output channel, symmetric, no zero point):
  scale[o] = max_i |w[i, o]| / QMAX   over the kernel's input axes i (1.0 where the channel is 0)
  int8:  q = clip(round(w / scale), -127, 127)          |w - q * scale| <= scale / 2
  fp8:   q = float8_e4m3fn(w / scale)  (QMAX = 448, the format's largest finite value; round to
         nearest even)                                |w - q * scale| <= max(2^-4 |w|, 2^-10 scale)
  int4:  q = clip(round(w / scale), -7, 7)  (QMAX = 7)  |w - q * scale| <= scale / 2
int4 is the mismatch dial's "4-bit weights" (rollout.dtype="int4", trustrl.rollout.mismatch):
per output channel like the 8-bit kinds, so coarser than the group-wise (e.g. 128 inputs per
scale) 4-bit checkpoints engines serve; it is a deliberate, large mismatch source, not a model
of a particular engine's 4-bit format.
Quantised: the attention and MLP projections (q, k, v, o, gate, up, down). The embedding and
the LM head stay at the rollout dtype, as weight-only int8 / fp8 checkpoints commonly keep them
(their error would also hit every logit alike); norms and biases too.

Why not qwix (Google's JAX quantisation library): it quantises by intercepting the matmuls of a
Flax module at trace time, with its own parameter layout; trustrl's decode path, scanned layers,
sharding rules and Hugging Face export address parameters by name, and the scheme needed here is
a dozen lines of exactly checkable array code (tests/model/test_quant.py), so it is written out.
"""
from __future__ import annotations

import jax.numpy as jnp

QUANT = ("int8", "fp8", "int4")
STORAGE = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn, "int4": jnp.int4}
QMAX = {"int8": 127.0, "fp8": 448.0, "int4": 7.0}
# matmul kernels of the trunk -> number of leading input axes (the rest are output channels)
KERNELS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1,
           "down_proj": 1}
SCALE_SUFFIX = "_scale"


def check_kind(kind: str):
    if kind not in QUANT:
        raise ValueError(f"unknown weight quantisation {kind!r}; valid: {QUANT}")


def quantize(w, in_ndim: int, kind: str, lead: int = 0):
    """w [*lead, *in, *out] -> (q [same shape] in the storage dtype, scale [*lead, *out]
    float32); ``lead`` leading axes (a stacked layer axis) are kept apart like channels."""
    check_kind(kind)
    w = jnp.asarray(w, jnp.float32)
    axes = tuple(range(lead, lead + in_ndim))
    amax = jnp.max(jnp.abs(w), axis=axes)
    scale = jnp.where(amax > 0, amax / QMAX[kind], 1.0).astype(jnp.float32)
    x = w / jnp.expand_dims(scale, axes)
    if kind in ("int8", "int4"):
        x = jnp.clip(jnp.round(x), -QMAX[kind], QMAX[kind])
    return x.astype(STORAGE[kind]), scale


def dequantize(q, scale, in_ndim: int, dtype, lead: int = 0):
    """q * scale in float32 (scale broadcast over the input axes), then cast to ``dtype``."""
    axes = tuple(range(lead, lead + in_ndim))
    return (q.astype(jnp.float32) * jnp.expand_dims(scale, axes)).astype(dtype)


def quantize_params(params, kind: str, stacked: bool):
    """The kernels of KERNELS (anywhere in the tree) replaced by their quantised values, each
    with a ``<name>_scale`` sibling: the parameter layout of a ``weight_quant`` ModelConfig.
    ``stacked``: layers under "layers" carry a leading layer axis (scan_layers)."""
    check_kind(kind)

    def walk(tree, in_stack):
        out = {}
        for name, value in tree.items():
            if isinstance(value, dict):
                out[name] = walk(value, in_stack or (stacked and name == "layers"))
            elif name in KERNELS and jnp.issubdtype(jnp.asarray(value).dtype, jnp.floating):
                out[name], out[name + SCALE_SUFFIX] = quantize(value, KERNELS[name], kind,
                                                               lead=int(in_stack))
            else:
                out[name] = value
        return out

    return walk(params, False)


def dequantize_params(params, dtype, stacked: bool):
    """The inverse layout: every quantised kernel as ``q * scale`` in ``dtype`` (the scale
    leaves dropped). The rollout's weights as dense arrays: the reference the tests compare
    the quantised model against."""
    def walk(tree, in_stack):
        out = {}
        for name, value in tree.items():
            if isinstance(value, dict):
                out[name] = walk(value, in_stack or (stacked and name == "layers"))
            elif name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in KERNELS:
                continue
            elif name in KERNELS and name + SCALE_SUFFIX in tree:
                out[name] = dequantize(value, tree[name + SCALE_SUFFIX], KERNELS[name], dtype,
                                       lead=int(in_stack))
            else:
                out[name] = value
        return out

    return walk(params, False)


def is_quantized(x) -> bool:
    return jnp.asarray(x).dtype in {jnp.dtype(t) for t in STORAGE.values()}
