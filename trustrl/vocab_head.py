"""Fused, chunked vocabulary head: per-token outputs without ever building [tokens, vocab] logits.

    out = vocab_head.fused_head(hidden, w, targets, mu_hidden=..., mu_w=..., topk_ids=...,
                                temperature=0.7, mesh=mesh)
    out["logp"]       [...]     log pi(target), differentiable w.r.t. hidden and w
    out["entropy"]    [...]     H(pi)                               (not differentiated)
    out["topk_logp"]  [..., K]  log pi at mu's top-K ids            (only with topk_ids; not diff.)
    out["tv"], out["kl"] [...]  exact TV(mu, pi) and KL(mu || pi)  (only with mu_hidden; not diff.)

pi's logits are ``hidden @ W / temperature`` and mu's ``mu_hidden @ mu_W / temperature`` (mu: the
frozen rollout parameters at the rollout precision, given as hidden states only). Tokens are
processed in chunks of ``token_chunk`` (a lax.scan) and each chunk's vocabulary in slices of
``vocab_chunk``; the matmul accumulates in float32 and every statistic is a float32 online
reduction (running max, sum of exp, sum of exp * logit), so the live memory is O(chunk x vocab
slice) whatever the sequence length. A custom VJP saves only the per-token logsumexp and
recomputes each logit tile in the backward pass:

    d logp_t / d z_t = onehot(y_t) - softmax(z_t)      (z = logits / temperature)

The exact TV needs both normalisers before |mu - pi| can be summed; with one vocabulary slice
per token chunk (the default) it is computed from the tile already in memory, with several
slices a second pass recomputes the tiles.

With a mesh whose ``tensor`` axis is > 1 the vocabulary is split over it (shard_map): each
device reduces its slice and the partial statistics are combined with pmax / psum; in the
backward pass the hidden-state gradient is a psum over the vocabulary shards and the weight
gradient a psum over the batch shards. Nothing is gathered.

The plain path (``model.lm_head`` + ``jax.nn.log_softmax``) stays as the test reference.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from trustrl import sharding as sharding_lib

DEFAULT_TILE_ELEMENTS = 2 ** 26  # token_chunk=0: tokens per chunk = this // local vocabulary


def head_weight(params, model_cfg):
    """(W, vocab_axis) of the model's vocabulary head, cast to the compute dtype as the model
    does (to ``head_dtype`` when the config sets one: the matmul then runs in it).

    Tied models use the [V, E] embedding (vocab_axis 0), untied ones the [E, V] lm_head (1).
    """
    if model_cfg.tie_word_embeddings:
        w, axis = params["embedding"], 0
    else:
        w, axis = params["lm_head"], 1
    return jnp.asarray(w, model_cfg.head_dtype or model_cfg.compute_dtype), axis


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static layout of one fused-head call."""
    vocab_axis: int              # vocabulary axis of W (0: [V, E], 1: [E, V])
    temperature: float
    token_chunk: int             # 0: from DEFAULT_TILE_ELEMENTS
    vocab_chunk: int             # 0: the whole local vocabulary in one slice
    vocab_shard_axis: str | None  # mesh axis the vocabulary is split over (inside shard_map)
    batch_shard_axes: tuple = ()  # mesh axes the tokens' leading axis is split over

    def spans(self, local_vocab: int):
        size = self.vocab_chunk if 0 < self.vocab_chunk < local_vocab else local_vocab
        return [(lo, min(lo + size, local_vocab)) for lo in range(0, local_vocab, size)]

    def chunk(self, n: int, local_vocab: int) -> int:
        c = self.token_chunk or max(8, DEFAULT_TILE_ELEMENTS // max(local_vocab, 1) // 8 * 8)
        return max(1, min(c, n))


# ------------------------------------------------------------------------------- tile helpers

def _tile(h, w, lo, hi, spec):
    """Logits tile [C, hi - lo] float32 of vocabulary slice [lo, hi): h @ W[slice] / temperature."""
    dtype = jnp.result_type(h, w)
    wc = jax.lax.slice_in_dim(w, lo, hi, axis=spec.vocab_axis).astype(dtype)
    contract = 1 if spec.vocab_axis == 0 else 0
    z = jax.lax.dot_general(h.astype(dtype), wc, (((1,), (contract,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return z if spec.temperature == 1.0 else z / spec.temperature


def _gather(z, idx, lo, hi):
    """z at local vocabulary ids ``idx`` [C, ...] where lo <= idx < hi, else 0."""
    rel = idx - lo
    inside = (rel >= 0) & (rel < hi - lo)
    flat = rel.reshape(rel.shape[0], -1)
    got = jnp.take_along_axis(z, jnp.clip(flat, 0, hi - lo - 1), axis=1).reshape(rel.shape)
    return jnp.where(inside, got, 0.0)


class _Online:
    """Running (max m, sum exp(z - m) s, sum exp(z - m) * x a) over vocabulary slices."""

    def __init__(self, c):
        self.m = jnp.full((c,), -jnp.inf, jnp.float32)
        self.s = jnp.zeros((c,), jnp.float32)
        self.a = jnp.zeros((c,), jnp.float32)

    def add(self, z, x):
        m = jnp.maximum(self.m, jnp.max(z, axis=1))
        scale = jnp.exp(self.m - m)
        e = jnp.exp(z - m[:, None])
        self.m, self.s = m, self.s * scale + jnp.sum(e, axis=1)
        self.a = self.a * scale + jnp.sum(e * x, axis=1)

    def combine(self, axis_name):
        """Statistics over all vocabulary shards: (global max, s, a) rescaled to it."""
        if axis_name is None:
            return self.m, self.s, self.a
        m = jax.lax.pmax(self.m, axis_name)
        scale = jnp.exp(self.m - m)
        return m, jax.lax.psum(self.s * scale, axis_name), jax.lax.psum(self.a * scale, axis_name)


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


# ------------------------------------------------------------------------------ per-shard bodies

def _forward_chunk(spec, w, wm, h, y, hm, ids, offset):
    """Outputs for one token chunk on one vocabulary shard (statistics combined over shards)."""
    local_vocab = w.shape[spec.vocab_axis]
    spans = spec.spans(local_vocab)
    ax = spec.vocab_shard_axis
    y, ids = y - offset, (None if ids is None else ids - offset)
    pi = _Online(h.shape[0])
    mu = None if hm is None else _Online(h.shape[0])
    zy = jnp.zeros(h.shape[:1], jnp.float32)
    zk = None if ids is None else jnp.zeros(ids.shape, jnp.float32)
    kept = None
    for lo, hi in spans:
        z = _tile(h, w, lo, hi, spec)
        pi.add(z, z)
        zy = zy + _gather(z, y, lo, hi)
        if ids is not None:
            zk = zk + _gather(z, ids, lo, hi)
        if mu is not None:
            zm = _tile(hm, wm, lo, hi, spec)
            mu.add(zm, zm - z)  # a = sum exp(zm - m) (zm - z): KL's cross term
            if len(spans) == 1:
                kept = (z, zm)
    m, s, a = pi.combine(ax)
    lse = m + jnp.log(s)
    out = {"logp": _psum(zy, ax) - lse, "entropy": lse - a / s}
    if ids is not None:
        out["topk_logp"] = _psum(zk, ax) - lse[:, None]
    if mu is not None:
        mm, sm, am = mu.combine(ax)
        lse_mu = mm + jnp.log(sm)
        # KL(mu || pi) = sum_v mu_v ((zm - lse_mu) - (z - lse)) = E_mu[zm - z] - lse_mu + lse
        out["kl"] = jnp.maximum(am / sm - lse_mu + lse, 0.0)
        tv = jnp.zeros_like(lse)
        for lo, hi in spans:
            z, zm = kept if kept is not None else (_tile(h, w, lo, hi, spec),
                                                   _tile(hm, wm, lo, hi, spec))
            tv = tv + jnp.sum(jnp.abs(jnp.exp(zm - lse_mu[:, None]) - jnp.exp(z - lse[:, None])),
                              axis=1)
        out["tv"] = 0.5 * _psum(tv, ax)
    return out, lse


def _backward_chunk(spec, w, h, y, lse, g, offset):
    """(dh [C, E] float32, [dW slice float32 per vocabulary span]) of sum_t g_t logp_t."""
    local_vocab = w.shape[spec.vocab_axis]
    y = y - offset
    dh = jnp.zeros(h.shape, jnp.float32)
    dws = []
    for lo, hi in spec.spans(local_vocab):
        z = _tile(h, w, lo, hi, spec)
        onehot = (jnp.arange(lo, hi)[None, :] == y[:, None]).astype(jnp.float32)
        dz = g[:, None] * (onehot - jnp.exp(z - lse[:, None]))
        if spec.temperature != 1.0:
            dz = dz / spec.temperature
        dtype = jnp.result_type(h, w)
        wc = jax.lax.slice_in_dim(w, lo, hi, axis=spec.vocab_axis).astype(dtype)
        dzc = dz.astype(dtype)
        if spec.vocab_axis == 0:  # W [V, E]
            dh = dh + jnp.dot(dzc, wc, preferred_element_type=jnp.float32)
            dws.append(jax.lax.dot_general(dzc, h.astype(dtype), (((0,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32))
        else:  # W [E, V]
            dh = dh + jax.lax.dot_general(dzc, wc, (((1,), (1,)), ((), ())),
                                          preferred_element_type=jnp.float32)
            dws.append(jax.lax.dot_general(h.astype(dtype), dzc, (((0,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32))
    return dh, dws


def _chunked(x, c, nchunks, fill=0):
    """[n, ...] -> [nchunks, c, ...], padded at the end with ``fill``."""
    pad = nchunks * c - x.shape[0]
    if pad:
        x = jnp.concatenate([x, jnp.full((pad, *x.shape[1:]), fill, x.dtype)])
    return x.reshape(nchunks, c, *x.shape[1:])


def _offset(spec, w):
    if spec.vocab_shard_axis is None:
        return 0
    return jax.lax.axis_index(spec.vocab_shard_axis) * w.shape[spec.vocab_axis]


def _local_forward(spec, w, wm, h, y, hm, ids):
    """Flattens the local tokens, scans token chunks; returns (outputs, lse) unflattened."""
    lead = h.shape[:-1]
    n = math.prod(lead)
    c = spec.chunk(n, w.shape[spec.vocab_axis])
    nc = -(-n // c)
    flat = lambda x: None if x is None else _chunked(x.reshape(n, *x.shape[len(lead):]), c, nc)
    xs = (flat(h), flat(y), flat(hm), flat(ids))
    offset = _offset(spec, w)

    def body(carry, x):
        hc, yc, hmc, idc = x
        return carry, _forward_chunk(spec, w, wm, hc, yc, hmc, idc, offset)

    _, (out, lse) = jax.lax.scan(body, None, xs)
    unflat = lambda x: x.reshape(nc * c, *x.shape[2:])[:n].reshape(*lead, *x.shape[2:])
    return jax.tree.map(unflat, out), unflat(lse)


def _local_backward(spec, w, h, y, lse, g):
    lead = h.shape[:-1]
    n = math.prod(lead)
    c = spec.chunk(n, w.shape[spec.vocab_axis])
    nc = -(-n // c)
    flat = lambda x: _chunked(x.reshape(n, *x.shape[len(lead):]), c, nc)
    offset = _offset(spec, w)
    spans = spec.spans(w.shape[spec.vocab_axis])
    e = h.shape[-1]
    shape = (lambda lo, hi: (hi - lo, e)) if spec.vocab_axis == 0 else (lambda lo, hi: (e, hi - lo))
    dw0 = [jnp.zeros(shape(lo, hi), jnp.float32) for lo, hi in spans]
    varying = tuple(a for a in (spec.vocab_shard_axis, *spec.batch_shard_axes) if a)
    if varying:  # inside shard_map the carry must have the body's (per-device) type
        dw0 = [jax.lax.pcast(x, varying, to="varying") for x in dw0]

    def body(dws, x):
        hc, yc, lc, gc = x  # padded tokens carry g = 0: no gradient
        dh, new = _backward_chunk(spec, w, hc, yc, lc, gc, offset)
        return [a + b for a, b in zip(dws, new)], dh

    dws, dh = jax.lax.scan(body, dw0, (flat(h), flat(y), flat(lse), flat(g.astype(jnp.float32))))
    dw = jnp.concatenate(dws, axis=spec.vocab_axis) if len(dws) > 1 else dws[0]
    dh = dh.reshape(nc * c, e)[:n].reshape(*lead, e)
    dh = _psum(dh, spec.vocab_shard_axis)
    for a in spec.batch_shard_axes:
        dw = jax.lax.psum(dw, a)
    return dh.astype(h.dtype), dw.astype(w.dtype)


# ---------------------------------------------------------------------------------- public API

def _mesh_specs(mesh, hidden, w_axis, vocab, batch_axes, vocab_axis_name):
    """(spec for local calls, token-leading PartitionSpec prefix, W PartitionSpec)."""
    if vocab_axis_name not in mesh.axis_names:
        raise ValueError(f"vocab axis {vocab_axis_name!r} not in mesh axes {mesh.axis_names}")
    if vocab % mesh.shape[vocab_axis_name]:
        raise ValueError(f"vocab size {vocab} not divisible by mesh axis "
                         f"{vocab_axis_name}={mesh.shape[vocab_axis_name]}")
    axes = tuple(a for a in batch_axes if a in mesh.axis_names and mesh.shape[a] > 1)
    if hidden.ndim < 2 or not axes or hidden.shape[0] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    lead = P(axes if axes else None)
    w_spec = P(vocab_axis_name, None) if w_axis == 0 else P(None, vocab_axis_name)
    return axes, lead, w_spec


def fused_head(hidden, w, targets, *, w_vocab_axis: int = 1, mu_hidden=None, mu_w=None,
               topk_ids=None, temperature: float = 1.0, token_chunk: int = 0,
               vocab_chunk: int = 0, mesh=None, vocab_axis_name: str = "tensor",
               batch_axes=sharding_lib.BATCH_AXES) -> dict:
    """Per-token head outputs from hidden states (see the module docstring).

    Args:
      hidden: [..., E] pi's hidden states (any float dtype).
      w: the head weight, [E, V] (``w_vocab_axis=1``) or [V, E] (``w_vocab_axis=0``, tied).
      targets: [...] int token ids whose log-prob is returned.
      mu_hidden, mu_w: mu's hidden states [..., E] and head weight (same layout as w), or None.
      topk_ids: [..., K] int ids at which log pi is returned, or None.
      temperature: logits are divided by it (> 0).
      token_chunk: tokens per chunk (0: DEFAULT_TILE_ELEMENTS // local vocabulary).
      vocab_chunk: vocabulary slice per tile (0: the whole local vocabulary).
      mesh: with a mesh whose ``vocab_axis_name`` axis is > 1 and divides V, the vocabulary is
        split over it and the leading token axis over ``batch_axes`` (when divisible).
    Returns: dict of float32 arrays, keys logp, entropy (+ topk_logp) (+ tv, kl).
    """
    if w_vocab_axis not in (0, 1) or w.ndim != 2:
        raise ValueError(f"w must be [E, V] (w_vocab_axis=1) or [V, E] (0), got shape {w.shape} "
                         f"with w_vocab_axis={w_vocab_axis}")
    e, vocab = w.shape[1 - w_vocab_axis], w.shape[w_vocab_axis]
    if hidden.shape[-1] != e or targets.shape != hidden.shape[:-1]:
        raise ValueError(f"hidden {hidden.shape} / targets {targets.shape} do not match the head "
                         f"weight {w.shape} (hidden [..., {e}], targets [...])")
    if (mu_hidden is None) != (mu_w is None):
        raise ValueError("mu_hidden and mu_w come together (both or neither)")
    if mu_hidden is not None and (mu_hidden.shape != hidden.shape or mu_w.shape != w.shape):
        raise ValueError(f"mu's hidden {mu_hidden.shape} / weight {mu_w.shape} must match pi's "
                         f"{hidden.shape} / {w.shape}")
    if topk_ids is not None and topk_ids.shape[:-1] != targets.shape:
        raise ValueError(f"topk_ids {topk_ids.shape} must be [..., K] over targets {targets.shape}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if token_chunk < 0 or vocab_chunk < 0:
        raise ValueError(f"token_chunk / vocab_chunk must be >= 0 (0 = automatic), got "
                         f"{token_chunk} / {vocab_chunk}")
    targets = targets.astype(jnp.int32)
    topk_ids = None if topk_ids is None else topk_ids.astype(jnp.int32)
    # A vocabulary the tensor axis does not divide runs unsplit (same values; the parameters
    # are then split unevenly, which jit handles as it does for the plain head).
    sharded = (mesh is not None and mesh.shape.get(vocab_axis_name, 1) > 1
               and vocab % mesh.shape[vocab_axis_name] == 0)
    if sharded:
        axes, lead, w_spec = _mesh_specs(mesh, hidden, w_vocab_axis, vocab, tuple(batch_axes),
                                         vocab_axis_name)
        spec = _Spec(w_vocab_axis, float(temperature), int(token_chunk), int(vocab_chunk),
                     vocab_axis_name, axes)
    else:
        spec = _Spec(w_vocab_axis, float(temperature), int(token_chunk), int(vocab_chunk), None)

    def spec_of(x):  # tokens' leading axis sharded, the rest replicated
        return P(*lead, *([None] * (x.ndim - 1)))

    def forward(h, w_, y, hm, wm, ids):
        fn = functools.partial(_local_forward, spec)
        if not sharded:
            return fn(w_, wm, h, y, hm, ids)
        tok = lambda x: None if x is None else spec_of(x)
        out_keys = ["logp", "entropy"] + (["topk_logp"] if ids is not None else []) + (
            ["kl", "tv"] if hm is not None else [])
        outs = ({k: P(*lead, *([None] * (len(targets.shape) - 1 + (k == "topk_logp"))))
                 for k in out_keys}, spec_of(y))
        return jax.shard_map(fn, mesh=mesh,
                             in_specs=(w_spec, None if wm is None else w_spec, tok(h), tok(y),
                                       tok(hm), tok(ids)),
                             out_specs=outs)(w_, wm, h, y, hm, ids)

    def backward(h, w_, y, lse, g):
        fn = functools.partial(_local_backward, spec)
        if not sharded:
            return fn(w_, h, y, lse, g)
        return jax.shard_map(fn, mesh=mesh,
                             in_specs=(w_spec, spec_of(h), spec_of(y), spec_of(y), spec_of(y)),
                             out_specs=(spec_of(h), w_spec))(w_, h, y, lse, g)

    @jax.custom_vjp
    def head(h, w_, y, hm, wm, ids):
        return forward(h, w_, y, hm, wm, ids)[0]

    def head_fwd(h, w_, y, hm, wm, ids):
        out, lse = forward(h, w_, y, hm, wm, ids)
        return out, (h, w_, y, lse)

    def head_bwd(res, ct):
        h, w_, y, lse = res
        dh, dw = backward(h, w_, y, lse, ct["logp"])
        # entropy / top-K / TV / KL are outputs without a gradient (documented); integer ids and
        # mu's (frozen) inputs get none either.
        return dh, dw, None, None, None, None

    head.defvjp(head_fwd, head_bwd)
    out = head(hidden, w, targets, mu_hidden, mu_w, topk_ids)
    return {k: (v if k == "logp" else jax.lax.stop_gradient(v)) for k, v in out.items()}


def plain_head(hidden, w, targets, *, w_vocab_axis: int = 1, mu_hidden=None, mu_w=None,
               topk_ids=None, temperature: float = 1.0) -> dict:
    """The reference: full [..., V] float32 logits, log_softmax, sums. Same outputs as fused_head
    (including which are differentiated); memory O(tokens x vocab)."""
    def logits(h, w_):
        dtype = jnp.result_type(h, w_)
        sub = "...e,ve->...v" if w_vocab_axis == 0 else "...e,ev->...v"
        return jnp.einsum(sub, h.astype(dtype), w_.astype(dtype),
                          preferred_element_type=jnp.float32) / temperature

    lp = jax.nn.log_softmax(logits(hidden, w), axis=-1)
    sg = jax.lax.stop_gradient
    out = {"logp": jnp.take_along_axis(lp, targets[..., None].astype(jnp.int32), -1)[..., 0],
           "entropy": sg(-jnp.sum(jnp.exp(lp) * lp, axis=-1))}
    if topk_ids is not None:
        out["topk_logp"] = sg(jnp.take_along_axis(lp, topk_ids.astype(jnp.int32), axis=-1))
    if mu_hidden is not None:
        lq = jax.nn.log_softmax(logits(mu_hidden, mu_w), axis=-1)
        out["tv"] = sg(0.5 * jnp.sum(jnp.abs(jnp.exp(lq) - jnp.exp(lp)), axis=-1))
        out["kl"] = sg(jnp.maximum(jnp.sum(jnp.exp(lq) * (lq - lp), axis=-1), 0.0))
    return out
