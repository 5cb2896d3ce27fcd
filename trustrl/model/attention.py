"""Causal self-attention with key padding and grouped-query heads, behind one function.

    out = attention.attend(q, k, v, valid, backend="auto", block_size=512)

q [B, T, H, D], k / v [B, T, K, D] (H % K == 0; K/V are never repeated to H heads), valid [B, T]
bool (1 = real token; prompts left-padded, responses right-padded). Query t attends key s iff
``s <= t`` (by column) and ``valid[:, s]``. Outputs of pad queries are finite garbage (the caller
masks them); every backend agrees on the real queries, in value and in gradient.

Backends (``BACKENDS``):
* ``xla``: the reference. Full [B, K, G, T, S] float32 scores and probabilities, kept by autodiff
  for the backward pass: O(T^2) memory per layer.
* ``blockwise``: flash-style online softmax in pure JAX (any platform, CPU included). Tiles of
  ``block_size`` queries x keys, tiles above the diagonal skipped; a custom VJP stores only the
  output and the row log-sum-exp (O(T)) and recomputes each tile's probabilities backwards.
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU, bf16 / fp16). cuDNN
  only knows right padding (sequence lengths), so each row is rotated to put its first real
  token at column 0 and rotated back; this needs each row's real tokens to be contiguous (true
  for every batch trustrl builds). A row that is not gets NaN outputs (never a silent wrong
  answer), which the train step reports as a skipped update.
* ``splash``: the Pallas TPU splash-attention kernel shipped with jax, with segment ids for the
  padding (pad = segment 0, real = 1); runs on CPU in Pallas interpret mode (tests only: slow).
  A Mosaic kernel cannot be partitioned by XLA, so under a mesh (``jax.set_mesh``) it runs
  inside a ``shard_map`` over the batch axes (rows) and the tensor axis (heads): each device
  runs the kernel on its own rows and heads, no communication (``sharded_splash``).
* ``auto``: ``resolve`` picks per platform and length (see ``AUTO_XLA_MAX_LEN``). The platform is
  the TARGET's: the devices of the mesh the program is traced under (``target_platform``), so a
  program compiled for a TPU topology from a CPU host (trustrl.tools.aot_check) gets splash,
  as the pod will; the host's default backend only when no mesh is set.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from trustrl.infra import sharding as sharding_lib

BACKENDS = ("auto", "xla", "blockwise", "cudnn", "splash")

# On CPU "auto" uses the xla reference up to this many columns and blockwise beyond. Measured
# (attention alone, fp32 forward+backward, B=4, 8 q / 4 kv heads of 64, blockwise tiles of 512;
# 2-core CPU shared with other jobs, so noisy; docs/performance.md): xla / blockwise time 0.35 at
# T=256, 0.85 at 512, 1.61 at 1,024, 0.97 at 2,048; past 512 blockwise is as fast or faster and
# its memory is linear, not quadratic.
AUTO_XLA_MAX_LEN = 512


def resolve(backend: str, length: int, dtype, platform: str | None = None) -> str:
    """The concrete backend for ``backend`` (maybe "auto") at ``length`` columns."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid: {BACKENDS}")
    if backend != "auto":
        return backend
    platform = target_platform() if platform is None else platform
    if platform == "tpu":
        return "splash"
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if platform == "cpu" and length <= AUTO_XLA_MAX_LEN:
        return "xla"
    return "blockwise"


def target_platform() -> str:
    """The platform the traced program will run on: that of the mesh set by ``jax.set_mesh``
    (its devices: a TPU topology's compile-only devices included), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def attend(q, k, v, valid, *, backend: str = "auto", block_size: int = 512):
    """Causal GQA self-attention: q [B, T, H, D], k, v [B, T, K, D], valid [B, T] -> [B, T, H, D]."""
    b, t, h, d = q.shape
    nk = k.shape[2]
    if k.shape != (b, t, nk, d) or v.shape != k.shape or h % nk:
        raise ValueError(f"attend needs q [B, T, H, D] and k, v [B, T, K, D] with H % K == 0; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    if valid.shape != (b, t):
        raise ValueError(f"valid must be [B, T] = {(b, t)}, got {valid.shape}")
    name = resolve(backend, t, q.dtype)
    valid = valid.astype(bool)
    if name == "xla":
        return xla_attention(q, k, v, valid)
    if name == "blockwise":
        return blockwise_attention(q, k, v, valid, block_size)
    if name == "cudnn":
        return cudnn_attention(q, k, v, valid)
    return sharded_splash(q, k, v, valid, interpret=target_platform() != "tpu")


def causal_mask(valid):
    """[B, T, T] bool: query t may attend key s (s <= t and valid[s])."""
    cols = jnp.arange(valid.shape[1])
    return valid.astype(bool)[:, None, :] & (cols[None, None, :] <= cols[None, :, None])


def masked_attention(q, k, v, mask):
    """The einsum reference against an explicit mask [B, T, S] (S may be a KV-cache length).

    q [B, T, H, D], k, v [B, S, K, D]. Scores and softmax in float32; probabilities cast to the
    compute dtype for the value matmul. A finite fill (not -inf) keeps fully masked rows (pad
    queries) NaN-free.
    """
    b, t, h, d = q.shape
    nk = k.shape[2]
    qg = q.reshape(b, t, nk, h // nk, d)  # query heads grouped by the kv head they share
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores * (d ** -0.5), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)


def xla_attention(q, k, v, valid):
    return masked_attention(q, k, v, causal_mask(valid))


# ----------------------------------------------------------------------------- blockwise


def blockwise_attention(q, k, v, valid, block_size: int = 512):
    """Online-softmax tiles with a recomputing custom VJP; nothing [T, T] is ever stored."""
    if block_size < 1:
        raise ValueError(f"attention block_size must be >= 1, got {block_size}")
    b, t, h, d = q.shape
    nk = k.shape[2]
    bs = min(block_size, t)
    pad = -t % bs
    if pad:  # padded keys are invalid; padded queries are dropped
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
    out = _flash(q.reshape(b, t + pad, nk, h // nk, d), k, v, valid, bs)
    return out[:, :t].reshape(b, t, h, d)


def _tile_mask(valid_j, i, j, bs):
    """[B, 1, 1, bs, bs]: key valid and key column <= query column, for query tile i, key tile j."""
    q_cols = i * bs + jnp.arange(bs)
    k_cols = j * bs + jnp.arange(bs)
    causal = k_cols[None, :] <= q_cols[:, None]
    return valid_j[:, None, None, None, :] & causal[None, None, None]


def _tiles(x, bs):
    """[B, T, ...] -> [B, n, bs, ...]."""
    return x.reshape(x.shape[0], x.shape[1] // bs, bs, *x.shape[2:])


def _flash_forward(q, k, v, valid, bs):
    """-> out [B, T, K, G, D] (q's dtype), lse [B, n, K, G, bs] float32 (+inf for empty rows)."""
    d = q.shape[-1]
    scale = d ** -0.5
    qt, kt, vt, valt = _tiles(q, bs), _tiles(k, bs), _tiles(v, bs), _tiles(valid, bs)
    n = qt.shape[1]

    def q_tile(i):
        qi = qt[:, i]  # [B, bs, K, G, D]
        shape = (qi.shape[0], qi.shape[2], qi.shape[3], bs)  # [B, K, G, bs]

        def body(j, carry):
            m, l, acc = carry
            s = jnp.einsum("bqkgd,bskd->bkgqs", qi, kt[:, j],
                           preferred_element_type=jnp.float32) * scale
            s = jnp.where(_tile_mask(valt[:, j], i, j, bs), s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # no (-inf) - (-inf)
            p = jnp.exp(s - m_safe[..., None])
            corr = jnp.exp(m - m_safe)
            acc = acc * corr[..., None] + jnp.einsum(
                "bkgqs,bskd->bkgqd", p.astype(vt.dtype), vt[:, j],
                preferred_element_type=jnp.float32)
            return m_new, l * corr + p.sum(-1), acc

        init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros((*shape, d), jnp.float32))
        # Causal: key tiles 0..i only. A dynamic trip count is fine: the VJP is ours.
        m, l, acc = jax.lax.fori_loop(0, i + 1, body, init)
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)
        return jnp.einsum("bkgqd->bqkgd", out).astype(q.dtype), lse

    out, lse = jax.lax.map(q_tile, jnp.arange(n))  # [n, B, bs, K, G, D], [n, B, K, G, bs]
    out = jnp.moveaxis(out, 0, 1).reshape(q.shape)
    return out, jnp.moveaxis(lse, 0, 1)


def _flash_backward(q, k, v, valid, out, lse, g, bs):
    d = q.shape[-1]
    scale = d ** -0.5
    qt, kt, vt, valt, dot_ = (_tiles(x, bs) for x in (q, k, v, valid, g))
    n = qt.shape[1]
    # D_i = sum_d dO * O per query (FlashAttention-2's rowsum term), tiled like lse.
    delta = jnp.einsum("bnqkgd,bnqkgd->bnkgq", dot_.astype(jnp.float32),
                       _tiles(out, bs).astype(jnp.float32))

    def k_tile(dq, j):
        kj, vj = kt[:, j], vt[:, j]

        def body(i, carry):
            dk, dv, dq = carry
            qi, doi = qt[:, i], dot_[:, i]
            s = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj,
                           preferred_element_type=jnp.float32) * scale
            p = jnp.where(_tile_mask(valt[:, j], i, j, bs),
                          jnp.exp(s - lse[:, i][..., None]), 0.0)
            dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(g.dtype), doi,
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta[:, i][..., None])).astype(q.dtype)
            dq_i = jnp.einsum("bkgqs,bskd->bqkgd", ds, kj, preferred_element_type=jnp.float32)
            dq = dq.at[:, i].add(dq_i * scale)
            dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qi,
                                 preferred_element_type=jnp.float32) * scale
            return dk, dv, dq

        zeros = jnp.zeros(kj.shape, jnp.float32)
        dk, dv, dq = jax.lax.fori_loop(j, n, body, (zeros, zeros, dq))  # query tiles i >= j
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(k_tile, jnp.zeros(qt.shape, jnp.float32), jnp.arange(n))
    dk, dv = (jnp.moveaxis(x, 0, 1).reshape(k.shape) for x in (dk, dv))
    return dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, valid, bs):
    return _flash_forward(q, k, v, valid, bs)[0]


def _flash_fwd(q, k, v, valid, bs):
    out, lse = _flash_forward(q, k, v, valid, bs)
    return out, (q, k, v, valid, out, lse)


def _flash_bwd(bs, res, g):
    q, k, v, valid, out, lse = res
    dq, dk, dv = _flash_backward(q, k, v, valid, out, lse, g, bs)
    return dq, dk, dv, np.zeros(valid.shape, jax.dtypes.float0)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- cuDNN


def _left_pads(valid):
    """Per row: the number of pad columns before the first real token, and whether the real
    tokens are contiguous (at most one pad -> real transition and one real -> pad)."""
    v = valid.astype(jnp.int32)
    first = jnp.argmax(v, axis=1)  # 0 for an all-pad row: nothing to rotate
    edges = jnp.sum(jnp.abs(jnp.diff(v, axis=1)), axis=1) + v[:, 0]
    return first.astype(jnp.int32), edges <= 2


def _rotate(x, shift):
    """Row b of x [B, T, ...] rotated left by shift[b] columns."""
    cols = (jnp.arange(x.shape[1])[None, :] + shift[:, None]) % x.shape[1]
    return jnp.take_along_axis(x, cols.reshape(*cols.shape, *([1] * (x.ndim - 2))), axis=1)


def cudnn_attention(q, k, v, valid, *, implementation: str = "cudnn"):
    """Left padding turned into right padding, then cuDNN's PADDING_CAUSAL flash attention.

    ``implementation="xla"`` runs the same wrapper through jax's XLA attention (the CPU test).
    """
    shift, contiguous = _left_pads(valid)
    lengths = jnp.sum(valid, axis=1, dtype=jnp.int32)
    qr, kr, vr = (_rotate(x, shift) for x in (q, k, v))
    out = jax.nn.dot_product_attention(qr, kr, vr, is_causal=True, query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths,
                                       implementation=implementation)
    out = _rotate(out, (out.shape[1] - shift) % out.shape[1])
    # A row with a hole in its real tokens would be attended wrongly: make that loud.
    return jnp.where(contiguous[:, None, None, None], out, jnp.nan).astype(q.dtype)


# ----------------------------------------------------------------------------- splash (TPU)


def splash_attention(q, k, v, valid, *, interpret: bool = False, block_size: int = 128):
    """The Pallas splash kernel (MQA form per kv head, so K/V are never repeated)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (splash_attention_kernel as sk,
                                                                  splash_attention_mask as sm)
    b, t, h, d = q.shape
    nk = k.shape[2]
    bs = block_size  # the kernel needs multiples of 128 lanes, whatever T is
    pad = -t % bs
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
    tp = t + pad
    mask = sm.MultiHeadMask([sm.CausalMask((tp, tp)) for _ in range(h // nk)])
    sizes = sk.BlockSizes(block_q=bs, block_kv=bs, block_kv_compute=bs, block_q_dkv=bs,
                          block_kv_dkv=bs, block_kv_dkv_compute=bs, block_q_dq=bs, block_kv_dq=bs)
    kernel = sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
    seg = sk.SegmentIds(q=valid.astype(jnp.int32), kv=valid.astype(jnp.int32))
    # kernel(q [G, T, D], k [T, D], v [T, D], segment_ids); the kernel applies no scale.
    qs = (q * (d ** -0.5)).astype(q.dtype).reshape(b, tp, nk, h // nk, d).transpose(0, 2, 3, 1, 4)
    ks, vs = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, D]
    per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over kv heads
    out = jax.vmap(per_head, in_axes=(0, 0, 0, 0))(qs, ks, vs, seg)  # [B, K, G, T, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tp, h, d)[:, :t].astype(q.dtype)


def splash_specs(mesh, q_shape, k_shape):
    """(q / k / v spec, valid spec) of ``sharded_splash`` on ``mesh``: rows over the batch axes
    and heads over "tensor" where they divide (kv heads too, so each device keeps whole GQA
    groups); an axis that does not divide is replicated (the kernel then runs redundantly there,
    with the same result)."""
    sizes = dict(mesh.shape)
    batch_axes = tuple(a for a in sharding_lib.BATCH_AXES if a in sizes)
    n_batch = math.prod(sizes[a] for a in batch_axes)
    rows = batch_axes if batch_axes and n_batch > 1 and q_shape[0] % n_batch == 0 else None
    t = sizes.get("tensor", 1)
    heads = "tensor" if t > 1 and q_shape[2] % t == 0 and k_shape[2] % t == 0 else None
    return P(rows, None, heads, None), P(rows, None)


def sharded_splash(q, k, v, valid, *, interpret: bool = False, block_size: int = 128):
    """``splash_attention`` under the mesh of ``jax.set_mesh`` (if any): a shard_map whose body
    sees each device's rows and heads. Without a mesh (or on one device) the plain kernel."""
    mesh = jax.sharding.get_abstract_mesh()
    fn = functools.partial(splash_attention, interpret=interpret, block_size=block_size)
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return fn(q, k, v, valid)
    qkv_spec, valid_spec = splash_specs(mesh, q.shape, k.shape)
    return jax.shard_map(fn, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, valid_spec),
                         out_specs=qkv_spec, check_vma=False)(q, k, v, valid)


# ----------------------------------------------------------------------------- decode (one query)

def decode_attention(q, k_cache, v_cache, valid, *, block_size: int = 0):
    """One new query per row against a KV cache: q [B, K, G, D] (G query heads per kv head),
    k_cache / v_cache [B, K, S, D] (read in place), valid [B, S] bool -> [B, K, G, D] float32.

    ``block_size`` 0 or >= S: one pass over all S slots. Otherwise an online softmax over
    blocks of ``block_size`` slots that stops after the last slot any row has written (found
    from ``valid``), so a decode step costs what the filled part of the cache costs, not the
    whole preallocated prompt bucket + max_new_tokens: at step t of a sampler call it reads
    P + t slots. Rows whose slots are all invalid get finite garbage (never attended)."""
    b, kh, g, d = q.shape
    s = k_cache.shape[2]
    scale = d ** -0.5
    fill = jnp.finfo(jnp.float32).min  # finite: fully masked rows stay NaN-free
    if not block_size or s <= block_size:
        scores = jnp.einsum("bkgd,bksd->bkgs", q, k_cache, preferred_element_type=jnp.float32)
        scores = jnp.where(valid[:, None, None], scores * scale, fill)
        probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
        return jnp.einsum("bkgs,bksd->bkgd", probs, v_cache, preferred_element_type=jnp.float32)

    bs = block_size
    written = jnp.any(valid, axis=0)  # [S]: some row holds a token here
    hi = s - jnp.argmax(written[::-1])  # one past the last written slot (0 if none)
    n_blocks = jnp.where(jnp.any(written), -(-hi // bs), 1)

    def body(carry):
        i, m, l, acc = carry
        # the last block is shifted back to end at S; its slots before i * bs were counted
        start = jnp.minimum(i * bs, s - bs)
        k = jax.lax.dynamic_slice_in_dim(k_cache, start, bs, axis=2)
        v = jax.lax.dynamic_slice_in_dim(v_cache, start, bs, axis=2)
        ok = jax.lax.dynamic_slice_in_dim(valid, start, bs, axis=1)
        ok = ok & (start + jnp.arange(bs) >= i * bs)[None, :]
        sc = jnp.einsum("bkgd,bksd->bkgs", q, k, preferred_element_type=jnp.float32)
        sc = jnp.where(ok[:, None, None], sc * scale, fill)
        m_new = jnp.maximum(m, sc.max(-1))
        p = jnp.exp(sc - m_new[..., None]) * ok[:, None, None]
        corr = jnp.exp(m - m_new)
        acc = acc * corr[..., None] + jnp.einsum("bkgs,bksd->bkgd", p.astype(v.dtype), v,
                                                 preferred_element_type=jnp.float32)
        return i + 1, m_new, l * corr + p.sum(-1), acc

    init = (jnp.int32(0), jnp.full((b, kh, g), fill, jnp.float32),
            jnp.zeros((b, kh, g), jnp.float32), jnp.zeros((b, kh, g, d), jnp.float32))
    _, _, l, acc = jax.lax.while_loop(lambda c: c[0] < n_blocks, body, init)
    return acc / jnp.maximum(l, jnp.finfo(jnp.float32).tiny)[..., None]
