"""Decoder-only transformer for the Llama 3, Qwen2 / Qwen2.5 and Qwen3 families (flax.linen).

One block: ``x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x))`` with rotary positions (RoPE, optional
Llama 3 frequency scaling), grouped-query attention, Qwen2's q/k/v biases and Qwen3's per-head q/k
RMSNorm. The public API is pure functions of ``(params, config, ...)``; ``params`` is a plain
nested dict of arrays (no flax metadata boxes), so optax and orbax see ordinary pytrees. The
logical axis names live only at init time: ``param_shardings`` / ``init_params`` turn them into
``NamedSharding``s through ``trustrl.infra.sharding.LOGICAL_RULES``.

Padding and position convention (the sampler and the trainer rely on it)
-----------------------------------------------------------------------
* A batch is a dense grid of token slots ``tokens [B, T]`` with ``valid [B, T]`` (1 = real token).
  Prompts are LEFT-padded, so every row's next token goes into the same column; responses that
  stop early are right-padded. Pad slots are never attended to as keys; their own outputs are
  finite garbage that the caller masks out.
* ``positions [B, T]`` int32 are the RoPE positions, normally ``positions_from_mask(valid)`` =
  ``max(cumsum(valid) - 1, 0)``: the first real token of every row sits at position 0 however much
  padding precedes it (what Hugging Face derives from an attention mask). A left-padded row thus
  gives the same logits as the unpadded row.
* Causality is by slot (column) order, not by position value.
* Attention (``trustrl.model.attention``): the training forward and ``prefill`` run the backend
named by
  ``attention`` ("auto": for the platform of the mesh the program is traced under: splash on
  TPU, inside a shard_map over rows and heads; cuDNN on GPU; the einsum reference or blockwise
  online softmax on CPU); ``decode_step`` attends one query against the cache with the einsum
  reference.
* Layers: with ``scan_layers`` (default) the decoder is one ``nn.scan`` over parameters stacked
  on a leading "layers" axis (``params["layers"]["attn"]["q_proj"]`` is [L, E, H, D]), each layer
  rematerialised by the ``remat`` policy; ``scan_layers=False`` is the unrolled reference
  (``params["layers_0"]``, ...). ``stack_layers`` / ``unstack_layers`` convert between the two
  (Hugging Face import / export and the KV-cache path, which runs the layers unrolled).
* KV cache (``init_cache``): fixed ``max_len`` slots per row plus a per-slot validity mask and one
  shared write column ``index``. ``prefill`` empties the cache and writes the T prompt columns at
  slots 0..T-1; each ``decode_step`` writes the next column (the same column for every row, its
  own position per row). Keys are stored already rotated, so decode only needs the new token's
  position. Slots never written, or written as padding, are masked, so one cache buffer can be
  donated and reused across sampler calls without clearing its keys / values. The write column
  wraps, and ``insert_rows`` prefills single rows into a running cache: the continuous-batching
  sampler uses each row as a ring of ``max_len`` slots.

Precision: parameters are stored in ``param_dtype`` and cast to the compute ``dtype``; RMSNorm
statistics, RoPE angles, the attention scores and softmax, the projections and the vocabulary
head accumulate in float32 (projection outputs are then rounded to the compute dtype), and logits
are always returned in float32. The KV cache follows the compute dtype unless told otherwise
(the sampler runs bf16 while the trainer runs fp32: that mismatch is deliberate).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding, PartitionSpec as P

from trustrl.model import attention as attention_lib
from trustrl.model import lora as lora_lib
from trustrl.model import moe as moe_lib
from trustrl.model import quant
from trustrl.infra import sharding as sharding_lib

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe")
# Rematerialisation of each layer in the backward pass. "none": keep every activation; "full":
# keep only each layer's input and recompute the rest; "dots": also keep the outputs of the
# weight matmuls (jax.checkpoint_policies.dots_with_no_batch_dims_saveable; not the attention's
# batched score matmuls). A bool is accepted for older configs: True -> "full", False -> "none".
REMAT_POLICIES = ("none", "full", "dots")


DTYPES = ("float32", "bfloat16")  # parameter / activation dtypes (int8 / fp8: quant.QUANT)


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1 RoPE frequency scaling (Hugging Face ``rope_type: llama3``)."""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and precision. Frozen and hashable, so it can be a static jit argument."""
    vocab_size: int
    hidden_size: int  # model width E
    intermediate_size: int  # SwiGLU hidden width F
    num_layers: int
    num_heads: int  # query heads H
    num_kv_heads: int  # key / value heads K (GQA: H % K == 0)
    head_dim: int  # D
    # llama | qwen2 (q/k/v biases) | qwen3 (q/k RMSNorm per head) | qwen3_moe (qwen3 attention,
    # mixture-of-experts MLPs: the num_experts fields below)
    family: str = "llama"
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False  # output head = embedding matrix
    max_position_embeddings: int = 4096  # only written to an exported config.json
    param_dtype: str = "float32"  # storage dtype of the parameters
    dtype: str = "float32"  # compute dtype of activations (and of the KV cache by default)
    remat: str = "full"  # per-layer rematerialisation policy: REMAT_POLICIES (or a bool)
    attention: str = "auto"  # attention backend: trustrl.model.attention.BACKENDS
    attention_block_size: int = 512  # blockwise backend: query / key tile length
    weight_quant: str = ""  # "" | "int8" | "fp8" | "int4": quantised kernels (trustrl.model.quant)
    # KV-cache decode: attend blocks of this many cache slots up to the last written one
    # (0: the whole cache in one pass); attention.decode_attention
    decode_block_size: int = 256
    scan_layers: bool = True  # one nn.scan over stacked layers (False: unrolled reference)
    # projections as 2-D matmuls (True) or einsums; benchmarks/model_forward.py measures both
    flatten_matmuls: bool = True
    head_token_chunk: int = 0  # trainer's fused vocabulary head: tokens per chunk (0: automatic)
    head_vocab_chunk: int = 0  # ... vocabulary slice per tile (0: the whole local vocabulary)
    # the vocabulary head's precision, weights and matmul ("": param_dtype / dtype like the
    # trunk; "float32": an fp32 head on the trunk's hidden states, e.g. a bf16 rollout engine
    # with an fp32 LM head). Tied embeddings are then stored in float32 too.
    head_dtype: str = ""
    # Mixture of experts (family qwen3_moe; Hugging Face Qwen3MoeConfig's fields). Layer i has
    # experts when i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0; the other
    # layers keep the dense MLP (intermediate_size). Scanned layers need every layer alike.
    num_experts: int = 0  # X; 0: a dense model
    num_experts_per_tok: int = 0  # k experts per token
    moe_intermediate_size: int = 0  # each expert's SwiGLU width
    norm_topk_prob: bool = False  # renormalise the k gate weights to sum 1
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    moe_impl: str = "ragged"  # moe.IMPLS: ragged (grouped matmul, dropless) | dense | capacity
    moe_capacity_factor: float = 0.0  # moe_impl="capacity": rows per expert = factor * N * k / X
    # LoRA adapters (trustrl.model.lora): rank > 0 adds <kernel>_lora_a / _lora_b parameters
    # (float32) to the projections named in lora_targets, scaled by lora_alpha / lora_rank
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: tuple[str, ...] = ()
    lora_init: str = "kaiming"  # lora.INITS: A's initialisation (B is zero)

    def __post_init__(self):
        if isinstance(self.remat, (bool, np.bool_)):  # older configs: remat = True / False
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; valid: {REMAT_POLICIES} "
                             "(or a bool: True = 'full', False = 'none')")
        if self.attention not in attention_lib.BACKENDS:
            raise ValueError(f"unknown attention backend {self.attention!r}; valid: "
                             f"{attention_lib.BACKENDS}")
        if int(self.attention_block_size) < 1:
            raise ValueError(f"attention_block_size must be >= 1, got {self.attention_block_size}")
        if self.weight_quant:
            quant.check_kind(self.weight_quant)
        if int(self.decode_block_size) < 0:
            raise ValueError(f"decode_block_size must be >= 0 (0 = the whole cache at once), "
                             f"got {self.decode_block_size}")
        for name in ("head_token_chunk", "head_vocab_chunk"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = automatic), got "
                                 f"{getattr(self, name)}")
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; valid: {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.head_dtype not in ("",) + DTYPES:
            raise ValueError(f"head_dtype must be '', 'float32' or 'bfloat16', got "
                             f"{self.head_dtype!r}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be 'float32' or 'bfloat16', got "
                                 f"{getattr(self, name)!r}")
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
        object.__setattr__(self, "lora_targets", tuple(str(t) for t in self.lora_targets))
        self._check_moe()
        if self.lora_rank or self.lora_targets:
            lora_lib.check_config(self.lora_rank, self.lora_alpha, self.lora_targets,
                                  self.lora_init)

    def _check_moe(self):
        moe = self.family == "qwen3_moe"
        if moe != (self.num_experts > 0):
            raise ValueError(f"family {self.family!r} with num_experts={self.num_experts}: a "
                             f"mixture of experts is family 'qwen3_moe' with num_experts >= 1, "
                             f"a dense model has num_experts=0")
        if not moe:
            return
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                             f"[1, num_experts={self.num_experts}]")
        if self.moe_intermediate_size < 1 or self.decoder_sparse_step < 1:
            raise ValueError(f"moe_intermediate_size ({self.moe_intermediate_size}) and "
                             f"decoder_sparse_step ({self.decoder_sparse_step}) must be >= 1")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"mlp_only_layers {bad} are not layers of a {self.num_layers}-layer "
                             f"model")
        if self.moe_impl not in moe_lib.IMPLS:
            raise ValueError(f"unknown moe_impl {self.moe_impl!r}; valid: {moe_lib.IMPLS}")
        if (self.moe_impl == "capacity") != (self.moe_capacity_factor > 0):
            raise ValueError(f"moe_capacity_factor={self.moe_capacity_factor} goes with "
                             f"moe_impl='capacity' (> 0) and only with it (0 otherwise)")
        if self.scan_layers and len(set(self.sparse_layers)) not in (0, self.num_layers):
            raise ValueError(f"layers {self.sparse_layers} of {self.num_layers} have experts "
                             f"(mlp_only_layers / decoder_sparse_step): scanned layers must be "
                             f"alike, so set scan_layers=False")

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        """The layers with experts (Hugging Face Qwen3MoeDecoderLayer's rule)."""
        if self.num_experts < 1:
            return ()
        return tuple(i for i in range(self.num_layers) if i not in self.mlp_only_layers
                     and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def qkv_bias(self) -> bool:
        return self.family == "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.family in ("qwen3", "qwen3_moe")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @classmethod
    def tiny(cls, vocab_size: int = 256, family: str = "llama", **overrides) -> ModelConfig:
        """2 layers, width 64, 4 query / 2 kv heads: fast on CPU, still exercises GQA."""
        fields = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, family=family)
        return cls(**{**fields, **overrides})

    @classmethod
    def tiny_shardable(cls, vocab_size: int = 256, family: str = "llama", **overrides):
        """Like ``tiny`` but with 8 query / 4 kv heads, so every tensor axis divides a 4-way mesh."""
        return cls.tiny(vocab_size, family, num_heads=8, num_kv_heads=4, head_dim=8, **overrides)

    @classmethod
    def smollm2_135m(cls, **overrides) -> ModelConfig:
        """SmolLM2-135M(-Instruct) architecture (Llama, tied embeddings)."""
        fields = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                      num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192)
        return cls(**{**fields, **overrides})


class KVCache(NamedTuple):
    """Preallocated attention cache: a pytree of fixed-shape arrays (donate-able under jit).

    k, v: one [B, K, S, D] array per layer (keys stored after RoPE); valid: [B, S] bool, slot holds
    a real token; index: int32 scalar, next column to write (it wraps modulo S). Heads before
    slots: a decode step's attention then reads the cache in place as [B*K] row-major [S, D]
    matrices (with [B, S, K, D] XLA:CPU copied every layer's whole cache into that layout at
    every step: measured 2x slower fp32 decode attention, 26 -> 13 ms per step for SmolLM2 at
    batch 32, 144 slots).
    """
    k: tuple
    v: tuple
    valid: jax.Array
    index: jax.Array


# ----------------------------------------------------------------------------- building blocks


def bitwise_on_cpu(write):
    """``write(buf, *updates) -> buf`` (a cache write: scatter, dynamic_update_slice, select;
    the updates cast to buf's dtype) run on the bit patterns of a 16-bit float ``buf`` when the
    program is lowered for XLA:CPU. XLA:CPU has no bf16 scatter or dynamic_update_slice: it
    converts the whole buffer to float32 and back around each, a pass over every layer's cache
    per decode step (and never in place). A copy of bits is exact: the same values bit for
    bit. Other platforms (TPU, GPU) write the floats as they are."""
    def wrapped(buf, *updates):
        updates = [u.astype(buf.dtype) for u in updates]
        if jnp.dtype(buf.dtype).itemsize != 2 or not jnp.issubdtype(buf.dtype, jnp.floating):
            return write(buf, *updates)
        bits = jax.lax.bitcast_convert_type

        def on_bits(buf, *updates):
            out = write(bits(buf, jnp.uint16), *(bits(u, jnp.uint16) for u in updates))
            return bits(out, buf.dtype)
        return jax.lax.platform_dependent(buf, *updates, cpu=on_bits, default=write)
    return wrapped


def write_columns(buf, cols, x):
    """``buf`` [B, K, S, D] with ``x`` [B, T, K, D] written at each row's own columns ``cols``
    [B, T] (a column >= S is dropped), as one D-vector per (row, kv head, column) triple: a
    scatter of [K, D] windows made the TPU compiler keep every layer's cache transposed inside
    the program, a copy of the whole cache per call (measured: Qwen3-1.7B, 128 rows x 9,216
    columns on v5p: 31.9 GiB of loop temporaries, 0.66 with the triples). Bit copies on CPU
    (``bitwise_on_cpu``)."""
    b, k = buf.shape[:2]
    at = (jnp.arange(b)[:, None, None], jnp.arange(k)[None, None, :], cols[:, :, None])
    return bitwise_on_cpu(lambda buf, x: buf.at[at].set(x, mode="drop"))(buf, x)


def _param(module: nn.Module, name: str, init, shape, axes, dtype=None):
    """A parameter created with logical axis names, returned cast to the compute dtype;
    ``dtype``: storage and returned dtype instead (the head under ``head_dtype``)."""
    c = module.config
    value = module.param(name, nn.with_logical_partitioning(init, axes), shape,
                         jnp.dtype(dtype or c.param_dtype))
    if value.dtype == _BITS:  # loop_storage's bit pattern
        value = jax.lax.bitcast_convert_type(value, jnp.bfloat16)
    return jnp.asarray(value, dtype or c.compute_dtype)


_BITS = jnp.uint16  # a bfloat16's bit pattern (loop_storage)


def loop_storage(params):
    """``params`` with the layer stack's (``params["layers"]``) bfloat16 leaves as their uint16
    bit patterns when the program targets the CPU; the model reads them back bitwise
    (``_param``), so the outputs are unchanged. Why: XLA:CPU computes bfloat16 in float32, and
    its float normalisation converts a bf16 stack to float32 BEFORE slicing one layer out of
    it, a conversion it then hoists out of the layer loop: a float32 copy of every layer's
    weights held through the step (a frozen bf16 LoRA base on Qwen3-0.6B: 1.6 GiB, twice the
    base; benchmarks/lora.py). An integer stack is sliced as it is and each layer's slice is
    converted in its own iteration. Only for weights that get no gradient (a bit pattern has
    none), and only inside a traced program (the arrays it returns are bit patterns, not
    weights): the LoRA base in ``training.step.train_step``. Other platforms: ``params``."""
    if "layers" not in params or attention_lib.target_platform() != "cpu":
        return params
    bits = jax.tree.map(lambda x: jax.lax.bitcast_convert_type(x, _BITS)
                        if x.dtype == jnp.bfloat16 else x, params["layers"])
    return {**params, "layers": bits}


_normal = nn.initializers.normal(0.02)  # Hugging Face's initializer_range default


def _kernel(module: nn.Module, name: str, shape, axes, in_ndim: int = 1):
    """A matmul kernel [*in, *out] in the compute dtype. Under ``weight_quant`` it is stored
    quantised (int8 / fp8) with per-output-channel float32 scales ``<name>_scale`` [*out]
    and dequantised here (trustrl.model.quant; the values come from ``quant.quantize_params``)."""
    c = module.config
    if not c.weight_quant:
        return _param(module, name, _normal, shape, axes)
    q = module.param(name, nn.with_logical_partitioning(nn.initializers.zeros, axes), shape,
                     quant.STORAGE[c.weight_quant])
    scale = module.param(name + quant.SCALE_SUFFIX, nn.with_logical_partitioning(
        nn.initializers.ones, axes[in_ndim:]), shape[in_ndim:], jnp.float32)
    return quant.dequantize(q, scale, in_ndim, c.compute_dtype)


def _dense(x, kernel, in_ndim: int = 1, out_dtype=None, flatten: bool = True):
    """``x [..., *in] @ kernel [*in, *out] -> [..., *out]`` as one 2-D matmul.

    Measured with benchmarks/model_forward.py (--no_flatten runs einsums instead) on a shared
    2-core CPU, fp32: forward+backward tokens/s 14.2k vs 12.7k (tiny, 8x128) and 181 vs 165
    (SmolLM2-135M, 4x128) in favour of flattening, forward 517 vs 611 against it: within the
    noise of the shared machine. XLA canonicalises einsums into the same GEMMs, so the gain is
    small either way; we keep the 2-D form for the training path (fwd+bwd), where it did no worse.
    """
    in_shape, out_shape = kernel.shape[:in_ndim], kernel.shape[in_ndim:]
    lead = x.shape[:x.ndim - in_ndim]
    out_dtype = jnp.result_type(x, kernel) if out_dtype is None else out_dtype
    if not flatten:
        letters = "abcdefgh"
        xs, ins, outs = letters[:len(lead)], "ij"[:in_ndim], "xyz"[:len(out_shape)]
        return jnp.einsum(f"{xs}{ins},{ins}{outs}->{xs}{outs}", x, kernel,
                          preferred_element_type=jnp.float32).astype(out_dtype)
    # Accumulate in float32 whatever the inputs (bf16 products summed in fp32, as GPU / TPU
    # matmuls and torch do), then round to the compute dtype. On XLA:CPU this is also the fast
    # path: bf16 x bf16 -> f32 runs oneDNN's bf16 GEMM (measured 130-240 GFLOP/s on 2 cores),
    # bf16 x bf16 -> bf16 a slow fallback (20-50 GFLOP/s). For float32 inputs nothing changes.
    y = jnp.dot(x.reshape(-1, math.prod(in_shape)), kernel.reshape(math.prod(in_shape), -1),
                preferred_element_type=jnp.float32).astype(out_dtype)
    return y.reshape(*lead, *out_shape)


def _lora_factors(module: nn.Module, name: str, shape, axes, in_ndim: int = 1, lead: int = 0):
    """The float32 LoRA factors of the kernel ``name`` [*lead, *in, *out] (``axes`` its logical
    axes): A [*lead, *in, r] (``lora.init_a`` over fan-in prod(*in)) and B [*lead, r, *out]
    (zero), with the kernel's axes on their kernel-side dimensions and none on the rank."""
    c = module.config
    r, k = c.lora_rank, lead + in_ndim
    a = module.param(name + lora_lib.A_SUFFIX, nn.with_logical_partitioning(
        lora_lib.init_a(c.lora_init, r, shape[lead:k]), axes[:k] + (None,)),
        shape[:k] + (r,), jnp.float32)
    b = module.param(name + lora_lib.B_SUFFIX, nn.with_logical_partitioning(
        nn.initializers.zeros, axes[:lead] + (None,) + axes[k:]),
        shape[:lead] + (r,) + shape[k:], jnp.float32)
    return a, b


def _project(module: nn.Module, name: str, x, shape, axes, in_ndim: int = 1, kernel=None):
    """``x @ kernel`` for the projection ``name`` (``_kernel``'s arguments; ``kernel``: its
    value when the caller already made it), plus its LoRA
    adapter's ``(alpha / rank) (x @ A) @ B`` when ``name`` is in ``config.lora_targets``
    (trustrl.model.lora): A, B float32 parameters used in the compute dtype, float32
    accumulation, the adapter's output added in the compute dtype (as PEFT adds it)."""
    c = module.config
    kernel = _kernel(module, name, shape, axes, in_ndim) if kernel is None else kernel
    y = _dense(x, kernel, in_ndim, flatten=c.flatten_matmuls)
    if name not in c.lora_targets:
        return y
    a, b = _lora_factors(module, name, shape, axes, in_ndim)
    h = _dense(x, a.astype(c.compute_dtype), in_ndim, flatten=c.flatten_matmuls)
    d = _dense(h, b.astype(c.compute_dtype), out_dtype=jnp.float32, flatten=c.flatten_matmuls)
    return y + (d * lora_lib.scale(c)).astype(y.dtype)


class RMSNorm(nn.Module):
    """Hugging Face's RMSNorm: statistics in float32, scale applied after casting back."""
    config: ModelConfig
    dim: int

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", nn.initializers.ones, (self.dim,), ("norm",))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)
                                + self.config.rms_norm_eps)
        return scale * y.astype(self.config.compute_dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies [D/2] (float32), with the Llama 3 scaling when configured.

    Same float32 arithmetic as transformers' ``_compute_llama3_parameters`` so angles match.
    """
    d = config.head_dim
    inv_freq = (1.0 / (np.float32(config.rope_theta)
                       ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))))
    inv_freq = inv_freq.astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(s.factor), inv_freq)
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    smoothed = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _rope_cos_sin(positions, config: ModelConfig):
    """cos, sin [B, T, D] for positions [B, T]; angles in float32, then the compute dtype."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(config))
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(config.compute_dtype), jnp.sin(angles).astype(config.compute_dtype)


def _apply_rope(x, cos, sin):
    """x [B, T, N, D]; the half-split ("rotate_half") convention of Hugging Face checkpoints."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class Attention(nn.Module):
    """Grouped-query self-attention, optionally reading / writing one layer of a KV cache."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, valid, mask=None, cache_kv=None, index=None):
        """x [B, T, E]; valid [B, T]; cache_kv ([B, K, S, D] x2) written at column ``index``.

        ``mask`` [B, T, S] None: causal self-attention over the T new columns (training, and a
        prefill into an emptied cache) through the configured backend. Otherwise the new columns
        attend the cache under ``mask`` with the einsum reference (decode).
        """
        c = self.config
        e, h, k, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        q = _project(self, "q_proj", x, (e, h, d), ("embed", "heads", "kv"))  # [B, T, N, D]
        key = _project(self, "k_proj", x, (e, k, d), ("embed", "heads", "kv"))
        val = _project(self, "v_proj", x, (e, k, d), ("embed", "heads", "kv"))
        # o_proj's kernel is made here, before the biases and norms (the order of the random
        # init's keys), and applied below
        wo = _kernel(self, "o_proj", (h, d, e), ("heads", "kv", "embed"), in_ndim=2)
        o_proj = lambda out: _project(self, "o_proj", out, wo.shape, ("heads", "kv", "embed"),
                                      in_ndim=2, kernel=wo)
        if c.qkv_bias:  # Qwen2: biases on q, k, v (not o)
            q = q + _param(self, "q_bias", nn.initializers.zeros, (h, d), ("heads", "kv"))
            key = key + _param(self, "k_bias", nn.initializers.zeros, (k, d), ("heads", "kv"))
            val = val + _param(self, "v_bias", nn.initializers.zeros, (k, d), ("heads", "kv"))
        if c.qk_norm:  # Qwen3: RMSNorm over each head's D features, before RoPE
            q = RMSNorm(c, d, name="q_norm")(q)
            key = RMSNorm(c, d, name="k_norm")(key)
        q, key = _apply_rope(q, cos, sin), _apply_rope(key, cos, sin)
        b, t = q.shape[:2]

        if cache_kv is not None:
            k_cache, v_cache = cache_kv  # [B, K, S, D]
            if jnp.ndim(index) == 2:  # per-row columns [B, T] (a row-indexed cache; S: dropped)
                k_cache = write_columns(k_cache, index, key)
                v_cache = write_columns(v_cache, index, val)
            else:
                put = bitwise_on_cpu(lambda buf, x: jax.lax.dynamic_update_slice(
                    buf, x.transpose(0, 2, 1, 3), (0, 0, index, 0)))
                k_cache, v_cache = put(k_cache, key), put(v_cache, val)
            cache_kv = (k_cache, v_cache)
        if mask is None:
            out = attention_lib.attend(q, key, val, valid, backend=c.attention,
                                       block_size=c.attention_block_size)
            return o_proj(out), cache_kv

        key, val = k_cache.astype(c.compute_dtype), v_cache.astype(c.compute_dtype)
        if t == 1:  # decode: no length-1 query axis, so XLA reads the cache without a copy
            out = attention_lib.decode_attention(
                q[:, 0].reshape(b, k, h // k, d), key, val, mask[:, 0],
                block_size=c.decode_block_size)
            out = out.astype(c.compute_dtype).reshape(b, 1, h, d)
        else:
            out = attention_lib.masked_attention(q, key.transpose(0, 2, 1, 3),
                                                 val.transpose(0, 2, 1, 3), mask)
        return o_proj(out), cache_kv


class Mlp(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        e, f = c.hidden_size, c.intermediate_size
        gate = _project(self, "gate_proj", x, (e, f), ("embed", "mlp"))
        up = _project(self, "up_proj", x, (e, f), ("embed", "mlp"))
        return _project(self, "down_proj", nn.silu(gate) * up, (f, e), ("mlp", "embed"))


class MoeMlp(nn.Module):
    """Qwen3-MoE's sparse block: a float32 router, num_experts SwiGLU experts (model/moe.py).

    ``routes`` [B, T, k] int: replay these experts (R3) with this router's gate weights; None:
    route by this router. Sows ("intermediates", "moe"): the experts each token went to
    (``ids`` [B, T, k]) and the per-expert sums of ``moe.load_sums`` over the valid tokens.

    Expert parallelism: under a ``jax.set_mesh`` mesh, moe_impl "ragged" runs the experts in
    ``moe.sharded_experts`` (a shard_map: experts split over the mesh axes of the "expert"
    logical axis, fsdp by default, their intermediate dimension over "tensor"; tokens
    all-gathered over the expert axis, outputs reduce-scattered back), so no device gathers
    another's expert weights. Without a mesh, or where the batch axes do not divide the batch
    (``moe.expert_parallel`` is None), and for moe_impl "dense" / "capacity" (unsharded
    reference paths that the SPMD partitioner lays out), ``moe.experts`` on all tokens: the
    same values either way."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x, valid, routes=None):
        c = self.config
        b, t, e = x.shape
        n, k, f = c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size
        router = _param(self, "router", _normal, (e, n), ("embed", None))
        in_axes, out_axes = ("expert", "expert_embed", "mlp"), ("expert", "mlp", "expert_embed")
        specs = (("expert_gate", (n, e, f), in_axes), ("expert_up", (n, e, f), in_axes),
                 ("expert_down", (n, f, e), out_axes))
        experts = [_param(self, name, _normal, shape, axes) for name, shape, axes in specs]
        w_gate, w_up, w_down = (self._adapted(w, *spec) for w, spec in zip(experts, specs))
        xf = x.reshape(b * t, e)
        probs = moe_lib.router_probs(xf, router)
        if routes is None:
            weights, ids = moe_lib.route(probs, k, c.norm_topk_prob)
        else:
            ids = routes.reshape(b * t, k).astype(jnp.int32)
            weights = moe_lib.replayed_weights(probs, ids, c.norm_topk_prob)
        mesh = jax.sharding.get_abstract_mesh()
        plan = (moe_lib.expert_parallel(mesh, b, n, f) if c.moe_impl == "ragged" else None)
        if plan is not None:
            y = moe_lib.sharded_experts(plan, mesh, x, ids.reshape(b, t, k),
                                        weights.reshape(b, t, k), w_gate, w_up, w_down,
                                        dtype=c.compute_dtype).reshape(b * t, e)
        else:
            cap = (moe_lib.capacity(b * t, k, n, c.moe_capacity_factor)
                   if c.moe_impl == "capacity" else 0)
            y = moe_lib.experts(xf, ids, weights, w_gate, w_up, w_down, impl=c.moe_impl,
                                dtype=c.compute_dtype, capacity_rows=cap)
        counts, prob_sums, tokens = moe_lib.load_sums(probs, ids, valid.reshape(-1))
        self.sow("intermediates", "moe", dict(ids=ids.reshape(b, t, k), counts=counts,
                                              prob_sums=prob_sums, tokens=tokens))
        return y.reshape(b, t, e).astype(x.dtype)

    def _adapted(self, w, name: str, shape, axes):
        """The expert weight ``w`` (``name`` [X, in, out], logical ``axes``), as a
        ``moe.Adapted`` with one LoRA adapter per expert (``_lora_factors``: a [X, in, r],
        b [X, r, out]) when its dense counterpart (lora.EXPERT_TARGETS: gate_proj / up_proj /
        down_proj) is a LoRA target."""
        c = self.config
        if lora_lib.EXPERT_TARGETS[name] not in c.lora_targets:
            return w
        a, b = _lora_factors(self, name, shape, axes, lead=1)
        return moe_lib.Adapted(w=w, a=a, b=b, scale=lora_lib.scale(c))


class Block(nn.Module):
    config: ModelConfig
    sparse: bool = False  # the MLP is the mixture of experts (MoeMlp)

    @nn.compact
    def __call__(self, x, cos, sin, valid, mask=None, cache_kv=None, index=None, routes=None):
        """-> (x, cache_kv); with cache_kv None this is also ``nn.scan``'s (carry, outputs).
        ``routes`` [B, T, k]: the experts to replay in a sparse layer (None: route)."""
        c = self.config
        if bits_residual(c):
            x = _through_bits(x)
        h, cache_kv = Attention(c, name="attn")(RMSNorm(c, c.hidden_size, name="input_norm")(x),
                                                cos, sin, valid, mask, cache_kv, index)
        x = _constrain_hidden(x + h)
        normed = RMSNorm(c, c.hidden_size, name="post_attn_norm")(x)
        if self.sparse:
            x = x + MoeMlp(c, name="mlp")(normed, valid, routes)
        else:
            x = x + Mlp(c, name="mlp")(normed)
        return _constrain_hidden(x), cache_kv


_INPUT_BITS = "layer_input_bits"  # the checkpoint name of a layer input's bit pattern


def bits_residual(config: ModelConfig) -> bool:
    """Whether each scanned layer's input is saved for the backward pass as its uint16 bit
    pattern instead of as bfloat16 (``_through_bits``; the values and gradients are the same
    bitwise). Only for a remat'd bf16 scan traced for the CPU. Why: the backward loop slices
    its saved layer inputs out of the [L, B, T, E] stack the forward scan wrote, and XLA:CPU's
    float normalisation converts a bf16 stack to float32 before slicing it, a conversion it
    hoists out of the loop: a float32 copy of the whole stack held through the backward pass
    (Qwen3-0.6B at 16 x 1,024 tokens: 1.75 GiB for a 0.88 GiB stack; benchmarks/lora.py). An
    integer stack is sliced as it is. The same problem for weights: ``loop_storage``."""
    return (config.scan_layers and config.remat != "none"
            and config.compute_dtype == jnp.bfloat16
            and attention_lib.target_platform() == "cpu")


def _via_bits(x):
    bits = checkpoint_name(jax.lax.bitcast_convert_type(x, _BITS), _INPUT_BITS)
    return jax.lax.bitcast_convert_type(bits, x.dtype)


@jax.custom_jvp
def _through_bits(x):
    """The identity on a bf16 ``x`` that passes it through its bit pattern, named
    ``_INPUT_BITS`` so that the remat policy saves the pattern and recomputes from it, not from
    ``x``. The tangent passes straight through (an integer has none). The rule computes the
    primal inline (not by calling this function), so the policy sees the name."""
    return _via_bits(x)


@_through_bits.defjvp
def _through_bits_jvp(primals, tangents):
    return _via_bits(primals[0]), tangents[0]


def _remat_policy(config: ModelConfig):
    """The jax.checkpoint policy of ``config.remat`` ("full" or "dots"; REMAT_POLICIES), plus
    saving the bit patterns of ``bits_residual``."""
    base = {"full": None,
            "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[config.remat]
    if not bits_residual(config):
        return base
    names = jax.checkpoint_policies.save_only_these_names(_INPUT_BITS)
    return names if base is None else jax.checkpoint_policies.save_from_both_policies(base, names)


def _constrain_hidden(x):
    """Pins [B, T, E] activations to batch-sharded / replicated-embed when a mesh is set.

    Without this, propagation on an fsdp mesh may shard activations along E like the weights.
    A no-op outside ``jax.set_mesh`` (or when the batch does not divide the batch axes).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(sharding_lib.BATCH_AXES) <= set(mesh.axis_names):
        return x
    n = math.prod(mesh.shape[a] for a in sharding_lib.BATCH_AXES)
    if n == 1 or x.shape[0] % n:
        return x
    return jax.lax.with_sharding_constraint(x, P(sharding_lib.BATCH_AXES, None, None))


class Transformer(nn.Module):
    """Trunk (``__call__`` -> final-normed hidden states) and vocabulary head (``logits``)."""
    config: ModelConfig

    def setup(self):
        c = self.config
        self.embedding = _param(self, "embedding", _normal, (c.vocab_size, c.hidden_size),
                                ("vocab", "embed"),
                                dtype=c.head_dtype if c.tie_word_embeddings else None)
        if c.scan_layers:  # one "layers" module whose parameters have a leading [L] axis
            # prevent_cse=False is safe (and faster) inside scan, as the jax.checkpoint docs say.
            block = (Block if c.remat == "none"
                     else nn.remat(Block, policy=_remat_policy(c), prevent_cse=False))
            # (cos, sin, valid, mask, cache_kv, index) broadcast; routes [L, B, T, k] scanned
            self.layers = nn.scan(
                block, variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True}, in_axes=(nn.broadcast,) * 6 + (0,),
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})(c, sparse=bool(c.sparse_layers))
        else:
            block = Block if c.remat == "none" else nn.remat(Block, policy=_remat_policy(c))
            sparse = set(c.sparse_layers)  # layers_0, layers_1, ...
            self.layers = [block(c, sparse=i in sparse) for i in range(c.num_layers)]
        self.final_norm = RMSNorm(c, c.hidden_size)
        if not c.tie_word_embeddings:
            self.lm_head = _param(self, "lm_head", _normal, (c.hidden_size, c.vocab_size),
                                  ("embed", "vocab"), dtype=c.head_dtype)

    def __call__(self, tokens, positions, valid, cache: KVCache | None = None,
                 fresh: bool = False, routes=None):
        """tokens, positions, valid [B, T] -> (hidden [B, T, E] compute dtype, cache).

        ``fresh``: the cache was just emptied, so the new columns only attend each other (a
        prefill runs the configured attention backend instead of the masked reference).
        ``routes`` [B, T, M, k] int: the experts each token is replayed to in each of the M
        sparse layers (``config.sparse_layers``, in order; R3); None: every MoE layer routes.
        """
        t = tokens.shape[1]
        valid = valid.astype(bool)
        x = _constrain_hidden(jnp.take(self.embedding, tokens, axis=0).astype(
            self.config.compute_dtype))
        cos, sin = _rope_cos_sin(positions, self.config)
        per_layer = None if routes is None else jnp.moveaxis(routes, 2, 0)  # [M, B, T, k]
        if cache is None:
            if self.config.scan_layers:  # every layer sparse (M = L) or none (routes unused)
                x, _ = self.layers(x, cos, sin, valid, None, None, None, per_layer)
            else:
                sparse = self.config.sparse_layers
                for i, layer in enumerate(self.layers):
                    x, _ = layer(x, cos, sin, valid, routes=None if per_layer is None or i not in
                                 sparse else per_layer[sparse.index(i)])
            return self.final_norm(x), None

        if self.config.scan_layers:
            raise ValueError("the KV-cache path runs unrolled layers: call model.prefill / "
                             "decode_step, which unstack the scanned parameters")
        s = cache.valid.shape[1]
        if cache.index.ndim:  # a row-indexed cache (``row_indexed``): each row's own column
            before = jnp.cumsum(valid, axis=1) - valid  # the row's valid new tokens before j
            q_cols = cache.index[:, None] + before  # [B, T]: where each valid token goes
            write = jnp.where(valid, q_cols, s)  # padding is not written (S: dropped)
            key_valid = cache.valid.at[jnp.arange(valid.shape[0])[:, None], write].set(
                True, mode="drop")
            new_index = cache.index + jnp.sum(valid, axis=1, dtype=cache.index.dtype)
        else:
            key_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, cache.index))
            q_cols = (jnp.arange(t) + cache.index)[None, :]
            write = cache.index
            # the write column wraps: a continuous-batching sampler uses the cache as a ring
            new_index = (cache.index + t) % s
        mask = None
        if not fresh and t == 1:  # one new column: every valid slot is earlier (or itself), so
            mask = key_valid[:, None, :]  # validity alone is causal, wherever the column is
        elif not fresh:
            mask = key_valid[:, None, :] & (jnp.arange(s)[None, None, :] <= q_cols[:, :, None])
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, valid, mask, (cache.k[i], cache.v[i]), write)
            new_k.append(kv[0])
            new_v.append(kv[1])
        cache = KVCache(tuple(new_k), tuple(new_v), key_valid, new_index)
        return self.final_norm(x), cache

    def logits(self, hidden):
        """hidden [..., E] -> logits [..., V] float32 (accumulated in float32)."""
        if self.config.head_dtype:
            hidden = hidden.astype(self.config.head_dtype)
        if not self.config.tie_word_embeddings:
            return _dense(hidden, self.lm_head, out_dtype=jnp.float32,
                          flatten=self.config.flatten_matmuls)
        # Tied: contract with the embedding's E axis directly. A jnp.dot with ``embedding.T``
        # takes a slow XLA:CPU path in bf16 (SmolLM2's [576 x 49152] head at batch 32: measured
        # 126 ms against 12 ms for this dot_general).
        e = hidden.shape[-1]
        y = jax.lax.dot_general(hidden.reshape(-1, e), self.embedding, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
        return y.reshape(*hidden.shape[:-1], self.config.vocab_size)

    def init_all(self, tokens):
        """Touches every parameter (trunk and head); used only by init."""
        ones = jnp.ones_like(tokens)
        return self.logits(self(tokens, jnp.cumsum(ones, 1) - 1, ones)[0])


# ----------------------------------------------------------------------------- functional API


def positions_from_mask(valid):
    """RoPE positions [B, T] int32 for a (left-)padded validity mask: first real token -> 0."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)


def forward(params, config: ModelConfig, tokens, positions, valid, routes=None):
    """The trunk: tokens, positions, valid [B, T] -> final-normed hidden states [B, T, E].
    ``routes`` [B, T, M, k]: replay these experts in the M sparse layers (R3)."""
    return Transformer(config).apply({"params": params}, tokens, positions, valid,
                                     routes=routes)[0]


def forward_moe(params, config: ModelConfig, tokens, positions, valid, routes=None):
    """``forward`` and what its MoE layers did: (hidden [B, T, E], moe) with moe["ids"]
    [B, T, M, k] the experts each token went to in each of the M sparse layers, and per layer
    the sums of ``moe.load_sums`` ("counts", "prob_sums" [M, X], "tokens" [M])."""
    (hidden, _), state = Transformer(config).apply(
        {"params": params}, tokens, positions, valid, routes=routes, mutable=["intermediates"])
    return hidden, moe_intermediates(state.get("intermediates", {}), config)


def moe_intermediates(intermediates, config: ModelConfig) -> dict:
    """The sparse layers' sown ("intermediates", "moe") dicts, stacked over the layers (the
    layer axis of "ids" moved after the token axis)."""
    if config.scan_layers:
        per_layer = intermediates["layers"]["mlp"]["moe"][0]  # already stacked [L, ...]
    else:
        layers = [intermediates[f"layers_{i}"]["mlp"]["moe"][0] for i in config.sparse_layers]
        per_layer = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return {**per_layer, "ids": jnp.moveaxis(per_layer["ids"], 0, 2)}


def lm_head(params, config: ModelConfig, hidden):
    """Vocabulary head: hidden [..., E] -> logits [..., V] float32."""
    return Transformer(config).apply({"params": params}, hidden, method=Transformer.logits)


def forward_logits(params, config: ModelConfig, tokens, positions, valid):
    """``lm_head(forward(...))``: logits [B, T, V] float32 (position t predicts token t+1)."""
    return lm_head(params, config, forward(params, config, tokens, positions, valid))


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty KV cache for ``batch`` rows of ``max_len`` slots (dtype: compute dtype)."""
    dtype = config.compute_dtype if dtype is None else jnp.dtype(dtype)
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return KVCache(zeros(), zeros(), jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))


def insert_rows(cache: KVCache, new: KVCache, slots) -> KVCache:
    """Writes the R rows of ``new`` (a [R, ., P, .] cache whose prefill wrote columns [0, P))
    into rows ``slots`` [R] of ``cache`` just before its write column ``end = cache.index``, at
    columns ``end - P .. end - 1`` (mod its length S); every other slot of those rows is marked
    empty. A slot index >= B (a padding row) is dropped. The rows then decode on as if alone:
    decode attention needs only validity (keys carry their RoPE positions), so a row's tokens
    may sit anywhere in the ring (the continuous-batching sampler's refill).

    In place: each row's keys / values are written by dynamic_update_slices of a [1, K, P, D]
    window (at min(end - P, S - P), and at column 0 for the part of a run that wraps past column
    S), each blended with the window's old contents, which a padding row writes back unchanged.
    Nothing else is read or written, so XLA updates the donated per-layer buffers in place, also
    inside the sampler's while loop. (A scatter of the R x P columns made the TPU compiler
    transpose a copy of every layer's cache to scatter into it: ~35 of Qwen3-8B's 42.55 GiB of
    sampler temporaries at 512 slots x 16,896 columns. A windowed scatter, a loop over rows or
    a lax.cond around the refill each cost a copy of the cache as well; continuous.py keeps the
    refill outside its cond.) The rows are unrolled: R x layers x 4 small updates."""
    s, p, end = cache.valid.shape[1], new.valid.shape[1], cache.index
    b = cache.valid.shape[0]
    first = (end - p) % s  # the rows' columns are first .. first + P - 1 (mod S)
    j = jnp.arange(p)
    windows = []  # (start column, window column j holds new column j - shift, which are new)
    for start in (jnp.minimum(first, s - p), jnp.zeros_like(first)):  # 2nd: the wrapped part
        shift = jnp.where(start == jnp.minimum(first, s - p), first - start, first - s)
        windows.append((start, shift, (j - shift >= 0) & (j - shift < p)))

    @bitwise_on_cpu
    def put(buf, x):  # buf [B, K, S, D], x [R, K, P, D]
        # jnp.roll, not a gather (jnp.take): a gather feeding the updates made the TPU compiler
        # copy the whole buffer
        vals = [jnp.roll(x, shift, axis=2) for _, shift, _ in windows]
        for i in range(x.shape[0]):
            row = jnp.minimum(slots[i], b - 1)
            for (start, _, ok), val in zip(windows, vals):
                at = (row, 0, start, 0)
                old = jax.lax.dynamic_slice(buf, at, (1, buf.shape[1], p, buf.shape[3]))
                write = ok & (slots[i] < b)
                buf = jax.lax.dynamic_update_slice(
                    buf, jnp.where(write[None, None, :, None], val[i:i + 1], old), at)
        return buf

    rows, cols = slots[:, None], ((end - p + j) % s)[None, :]
    valid = cache.valid.at[slots].set(False, mode="drop").at[rows, cols].set(new.valid,
                                                                             mode="drop")
    return cache._replace(k=tuple(map(put, cache.k, new.k)), v=tuple(map(put, cache.v, new.v)),
                          valid=valid)


def row_indexed(cache: KVCache) -> KVCache:
    """The cache with one write column per row (``index`` [B], all 0) instead of the shared
    one: each row's valid new tokens are written at its own next columns and padding columns
    are not written at all, so a row that waits, or takes an observation of another length,
    uses no column of another's (the multi-turn sampler, trustrl.rollout.multiturn). A prefill
    writes each row's prompt compactly at columns 0 .. length - 1. Writes past the end are
    dropped: the caller sizes the cache (the longest row's tokens)."""
    return cache._replace(index=jnp.zeros(cache.valid.shape[:1], jnp.int32))


def reset_cache(cache: KVCache) -> KVCache:
    """Marks every slot empty; keys and values are left as garbage (they are masked)."""
    return cache._replace(valid=jnp.zeros_like(cache.valid), index=jnp.zeros_like(cache.index))


def unrolled_config(config: ModelConfig) -> ModelConfig:
    """The same model with unrolled layers (``params["layers_0"]``, ...)."""
    return dataclasses.replace(config, scan_layers=False)


def unstack_layers(params, config: ModelConfig):
    """Stacked ``params["layers"]`` [L, ...] -> ``layers_0`` .. ``layers_{L-1}`` (a no-op for an
    unrolled config). Works on jax arrays (under jit: slices) and on host numpy arrays."""
    if not config.scan_layers:
        return params
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(config.num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out


def stack_layers(params, config: ModelConfig, mesh=None, rules=sharding_lib.LOGICAL_RULES):
    """Unrolled ``layers_i`` params -> the stacked layout of a ``scan_layers`` config (a no-op
    otherwise), placed with ``param_shardings(config, mesh)`` when ``mesh`` is given. The inputs
    are donated, so the peak is the unrolled copy plus one stacked copy, briefly."""
    if not config.scan_layers:
        return params
    names = [f"layers_{i}" for i in range(config.num_layers)]
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"stack_layers: params lack {missing[:3]} for num_layers="
                       f"{config.num_layers}")

    def stack(tree):
        out = {k: v for k, v in tree.items() if k not in names}
        out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[tree[n] for n in names])
        return out

    shardings = None if mesh is None else param_shardings(config, mesh, rules)
    return jax.jit(stack, out_shardings=shardings, donate_argnums=0)(params)


def _extend(params, config: ModelConfig, tokens, positions, valid, cache: KVCache,
            fresh: bool = False):
    """Runs [B, T] new columns against the cache, writing them at ``cache.index``.

    The cache path always runs the layers unrolled: the cache stays one [B, K, S, D] buffer per
    layer (batch-major, updated in place), which a scan over layers would copy every step.
    """
    params, config = unstack_layers(params, config), unrolled_config(config)
    return Transformer(config).apply({"params": params}, tokens, positions, valid, cache, fresh)


def prefill(params, config: ModelConfig, tokens, positions, valid, cache: KVCache):
    """Starts new sequences: empties ``cache`` (any previous contents), writes the prompt at column 0.

    tokens, positions, valid [B, T] (left-padded) -> (logits of the LAST column [B, V] float32,
    cache). With left padding the last column is every row's last real token, so these are the
    next-token logits. ``cache`` needs T + (number of decode steps) slots; writes past the end are
    not checked (XLA clamps the index).
    """
    hidden, cache = _extend(params, config, tokens, positions, valid, reset_cache(cache),
                            fresh=True)
    return lm_head(params, config, hidden[:, -1]), cache


def extend(params, config: ModelConfig, tokens, positions, valid, cache: KVCache):
    """Appends [B, T] tokens (``valid`` marks the real ones) to a running cache: -> (logits
    of each row's LAST valid column [B, V] float32 (garbage for a row with none), cache).
    With a ``row_indexed`` cache each row's tokens go to its own next columns."""
    hidden, cache = _extend(params, config, tokens, positions, valid, cache)
    t = tokens.shape[1]
    last = t - 1 - jnp.argmax(valid[:, ::-1].astype(jnp.int32), axis=1)
    hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return lm_head(params, config, hidden), cache


def decode_step(params, config: ModelConfig, tokens, positions, cache: KVCache, valid=None):
    """Appends one token per row: tokens, positions [B] -> (logits [B, V] float32, cache).
    ``valid`` [B] bool (default all): rows whose column is padding (a multi-turn row waiting or
    finished) write an empty slot, never attended; their logits are garbage."""
    tokens, positions = tokens[:, None], positions[:, None]
    valid = jnp.ones_like(tokens, bool) if valid is None else valid.astype(bool)[:, None]
    hidden, cache = _extend(params, config, tokens, positions, valid, cache)
    return lm_head(params, config, hidden[:, 0]), cache


# ----------------------------------------------------------------------------- sharded init


def _init_boxed(config: ModelConfig, rng):
    """Parameters still wrapped in flax's LogicallyPartitioned boxes (for their axis names)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Transformer(config).init(rng, tokens, method=Transformer.init_all)["params"]


def _is_box(x):
    return isinstance(x, nn.LogicallyPartitioned)


def param_logical_axes(config: ModelConfig):
    """Pytree (same structure as params) of logical axis-name tuples, e.g. ('embed', 'mlp')."""
    abstract = jax.eval_shape(lambda: _init_boxed(config, jax.random.key(0)))
    return jax.tree.map(lambda b: tuple(b.names), abstract, is_leaf=_is_box)


def param_shapes(config: ModelConfig):
    """Pytree of jax.ShapeDtypeStruct for the (unboxed) params; no computation."""
    return jax.eval_shape(lambda: nn.meta.unbox(_init_boxed(config, jax.random.key(0))))


def param_shardings(config: ModelConfig, mesh, rules=sharding_lib.LOGICAL_RULES):
    """Pytree of NamedSharding for the params (what the train step's jit needs).

    Logical names go through ``rules``. A dimension that its mesh axes do not divide (e.g. 9 heads
    on a 4-way tensor axis) is replicated instead, so any checkpoint loads on any mesh.
    """
    shapes = param_shapes(config)

    def to_sharding(names, shape):
        spec = sharding_lib.logical_to_spec(names, rules)
        dims = []
        for size, axes in zip(shape.shape, tuple(spec) + (None,) * (len(shape.shape) - len(spec))):
            flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
            dims.append(axes if size % math.prod(mesh.shape[a] for a in flat) == 0 else None)
        return NamedSharding(mesh, P(*dims))

    return jax.tree.map(to_sharding, param_logical_axes(config), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def init_params(config: ModelConfig, rng, mesh=None, rules=sharding_lib.LOGICAL_RULES):
    """Random parameters (plain pytree), created directly with their shardings when ``mesh``.

    jax.eval_shape(init) -> logical specs -> jax.jit(init, out_shardings=...): every device only
    ever materialises its own shard.
    """
    init = lambda key: nn.meta.unbox(_init_boxed(config, key))
    if mesh is None:
        return jax.jit(init)(rng)
    return jax.jit(init, out_shardings=param_shardings(config, mesh, rules))(rng)


def init_adapters(config: ModelConfig, rng, mesh=None, rules=sharding_lib.LOGICAL_RULES):
    """A LoRA model's freshly initialised adapters only (``lora.split``'s second tree: A as
    PEFT initialises it, B zero), with their shardings when ``mesh``; the base's init is not
    computed (XLA drops it)."""
    init = lambda key: lora_lib.split(nn.meta.unbox(_init_boxed(config, key)))[1]
    if mesh is None:
        return jax.jit(init)(rng)
    return jax.jit(init, out_shardings=lora_lib.split(param_shardings(config, mesh, rules))[1])(rng)
