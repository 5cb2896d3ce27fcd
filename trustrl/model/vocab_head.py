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

The plain path (``transformer.lm_head`` + ``jax.nn.log_softmax``) stays as the test reference.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from trustrl.core import divergences
from trustrl.infra import sharding as sharding_lib

DEFAULT_TILE_ELEMENTS = 2 ** 26  # token_chunk=0: tokens per chunk = this // local vocabulary
# loss-fused head: the cotangent of logp "is" the predicted g when max |c - g| <= this x max |g|
# (autodiff and the forward pass round the same product in different orders, ~1e-7 apart)
LOSS_GRAD_RTOL = 1e-5


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

def _forward_chunk(spec, w, wm, h, y, hm, ids, offset, keep_tile=False):
    """(outputs, lse, the logit tile when it is the only span and mu's TV or ``keep_tile`` wants
    it, else None) for one token chunk on one vocabulary shard (statistics combined over
    shards)."""
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
        elif keep_tile and len(spans) == 1:
            kept = (z, None)
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
    return out, lse, (None if kept is None else kept[0])


def _backward_chunk(spec, w, h, y, lse, g, offset, tile=None, per_token_dh=False):
    """(dh [C, E] float32, [dW slice float32 per vocabulary span]) of sum_t g_t logp_t.

    ``tile``: the chunk's logit tile when already in memory (one span), else recomputed.
    ``per_token_dh``: dh without the g_t factor, d logp_t / d h_t (this shard's vocabulary part),
    so that any later cotangent c gives the exact dh = c * dh."""
    local_vocab = w.shape[spec.vocab_axis]
    y = y - offset
    dh = jnp.zeros(h.shape, jnp.float32)
    dws = []
    for lo, hi in spec.spans(local_vocab):
        z = tile if tile is not None else _tile(h, w, lo, hi, spec)
        onehot = (jnp.arange(lo, hi)[None, :] == y[:, None]).astype(jnp.float32)
        d = onehot - jnp.exp(z - lse[:, None])
        if spec.temperature != 1.0:
            d = d / spec.temperature
        dz = g[:, None] * d
        dtype = jnp.result_type(h, w)
        wc = jax.lax.slice_in_dim(w, lo, hi, axis=spec.vocab_axis).astype(dtype)
        dzc = dz.astype(dtype)
        dhc = d.astype(dtype) if per_token_dh else dzc
        if spec.vocab_axis == 0:  # W [V, E]
            dh = dh + jnp.dot(dhc, wc, preferred_element_type=jnp.float32)
            dws.append(jax.lax.dot_general(dzc, h.astype(dtype), (((0,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32))
        else:  # W [E, V]
            dh = dh + jax.lax.dot_general(dhc, wc, (((1,), (1,)), ((), ())),
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


def _layout(spec, w, h):
    """(leading token shape, n tokens, chunk, number of chunks, flatten-and-chunk, unflatten)."""
    lead = h.shape[:-1]
    n = math.prod(lead)
    c = spec.chunk(n, w.shape[spec.vocab_axis])
    nc = -(-n // c)
    flat = lambda x: None if x is None else _chunked(x.reshape(n, *x.shape[len(lead):]), c, nc)
    unflat = lambda x: x.reshape(nc * c, *x.shape[2:])[:n].reshape(*lead, *x.shape[2:])
    return flat, unflat


def _dw_zeros(spec, w, e):
    """Per-span float32 weight-gradient accumulators (the scan carry)."""
    spans = spec.spans(w.shape[spec.vocab_axis])
    shape = (lambda lo, hi: (hi - lo, e)) if spec.vocab_axis == 0 else (lambda lo, hi: (e, hi - lo))
    dw0 = [jnp.zeros(shape(lo, hi), jnp.float32) for lo, hi in spans]
    varying = tuple(a for a in (spec.vocab_shard_axis, *spec.batch_shard_axes) if a)
    if varying:  # inside shard_map the carry must have the body's (per-device) type
        dw0 = [jax.lax.pcast(x, varying, to="varying") for x in dw0]
    return dw0


def _dw_total(spec, w, dws):
    dw = jnp.concatenate(dws, axis=spec.vocab_axis) if len(dws) > 1 else dws[0]
    for a in spec.batch_shard_axes:
        dw = jax.lax.psum(dw, a)
    return dw


def _local_forward(spec, grad_fn, w, wm, h, y, hm, ids, ex):
    """Flattens the local tokens, scans token chunks; returns (outputs, lse) unflattened, and
    with ``grad_fn`` (the loss-fused head) also (g, d logp / d h per token, dW of sum_t g_t
    logp_t), g = grad_fn(chunk outputs, chunk of ``ex``), from the tile already in memory."""
    flat, unflat = _layout(spec, w, h)
    xs = (flat(h), flat(y), flat(hm), flat(ids), jax.tree.map(flat, ex))
    offset = _offset(spec, w)

    def body(dws, x):
        hc, yc, hmc, idc, exc = x
        out, lse, tile = _forward_chunk(spec, w, wm, hc, yc, hmc, idc, offset,
                                        keep_tile=grad_fn is not None)
        if grad_fn is None:
            return dws, (out, lse)
        g = grad_fn(out, exc).astype(jnp.float32)  # padded tokens: ex = 0, so g = 0
        dh, new = _backward_chunk(spec, w, hc, yc, lse, g, offset, tile=tile, per_token_dh=True)
        return [a + b for a, b in zip(dws, new)], (out, lse, g, dh)

    if grad_fn is None:
        _, (out, lse) = jax.lax.scan(body, None, xs)
        return jax.tree.map(unflat, out), unflat(lse)
    dws, (out, lse, g, dh) = jax.lax.scan(body, _dw_zeros(spec, w, h.shape[-1]), xs)
    dh = _psum(unflat(dh), spec.vocab_shard_axis)
    # dW in the weight's dtype, as the recomputing backward returns it (what the fast path hands
    # back); per-token d logp / d h in float32 (scaled by the cotangent in the backward pass)
    return (jax.tree.map(unflat, out), unflat(lse), unflat(g), dh.astype(jnp.float32),
            _dw_total(spec, w, dws).astype(w.dtype))


def _local_backward(spec, w, h, y, lse, g):
    flat, unflat = _layout(spec, w, h)
    offset = _offset(spec, w)

    def body(dws, x):
        hc, yc, lc, gc = x  # padded tokens carry g = 0: no gradient
        dh, new = _backward_chunk(spec, w, hc, yc, lc, gc, offset)
        return [a + b for a, b in zip(dws, new)], dh

    dws, dh = jax.lax.scan(body, _dw_zeros(spec, w, h.shape[-1]),
                           (flat(h), flat(y), flat(lse), flat(g.astype(jnp.float32))))
    dh = _psum(unflat(dh), spec.vocab_shard_axis)
    return dh.astype(h.dtype), _dw_total(spec, w, dws).astype(w.dtype)


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
               batch_axes=sharding_lib.BATCH_AXES, logp_grad=None, on_correction=None) -> dict:
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
      logp_grad: None, or (fn, extras) for the loss-fused head: ``extras`` a pytree of per-token
        arrays [..., *] (the loss's own inputs: rollout log-probs, advantages, aggregation
        weights, ...) and ``fn(outputs, extras)`` -> the loss's d loss / d logp, elementwise over
        tokens (called on token chunks: ``outputs`` the chunk's head outputs, e.g.
        losses.logp_grad). The forward pass then also computes the weight gradient of
        sum_t g_t logp_t from the logit tile already in memory (3 head matmuls per step instead
        of 4); the backward pass checks the cotangent it receives against g and recomputes the
        weight gradient of the difference when they disagree, so the gradient is exact for any
        loss. Values are unchanged.
      on_correction: None, or a host callback ``(err, scale)`` run (jax.debug.callback) each
        time the loss-fused head's predicted g missed the cotangent and the weight gradient was
        recomputed: max |cotangent - g| and max |g| (diagnostics; tests check it never runs
        for the train step's own losses).
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

    grad_fn, extras = (None, None) if logp_grad is None else logp_grad

    def forward(h, w_, y, hm, wm, ids, ex, fused_grad):
        fn = functools.partial(_local_forward, spec, grad_fn if fused_grad else None)
        if not sharded:
            return fn(w_, wm, h, y, hm, ids, ex)
        tok = lambda x: None if x is None else spec_of(x)
        out_keys = ["logp", "entropy"] + (["topk_logp"] if ids is not None else []) + (
            ["kl", "tv"] if hm is not None else [])
        outs = ({k: P(*lead, *([None] * (len(targets.shape) - 1 + (k == "topk_logp"))))
                 for k in out_keys}, spec_of(y))
        if fused_grad:
            outs = outs + (spec_of(y), spec_of(h), w_spec)
        return jax.shard_map(fn, mesh=mesh,
                             in_specs=(w_spec, None if wm is None else w_spec, tok(h), tok(y),
                                       tok(hm), tok(ids), jax.tree.map(spec_of, ex)),
                             out_specs=outs)(w_, wm, h, y, hm, ids, ex)

    def backward(h, w_, y, lse, g):
        fn = functools.partial(_local_backward, spec)
        if not sharded:
            return fn(w_, h, y, lse, g)
        return jax.shard_map(fn, mesh=mesh,
                             in_specs=(w_spec, spec_of(h), spec_of(y), spec_of(y), spec_of(y)),
                             out_specs=(spec_of(h), w_spec))(w_, h, y, lse, g)

    @jax.custom_vjp
    def head(h, w_, y, hm, wm, ids, ex):
        return forward(h, w_, y, hm, wm, ids, ex, False)[0]

    def head_fwd(h, w_, y, hm, wm, ids, ex):
        if grad_fn is None:
            out, lse = forward(h, w_, y, hm, wm, ids, ex, False)
            return out, (h, w_, y, lse, None)
        out, lse, g, dh_tok, dw = forward(h, w_, y, hm, wm, ids, ex, True)
        return out, (h, w_, y, lse, (g, dh_tok, dw))

    def head_bwd(res, ct):
        h, w_, y, lse, fused = res
        c = ct["logp"].astype(jnp.float32)
        if fused is None:
            dh, dw = backward(h, w_, y, lse, c)
        else:  # the loss-fused head: dh exact for any cotangent, dW from the predicted g
            g, dh_tok, dw = fused
            dh = (c[..., None] * dh_tok).astype(h.dtype)
            # when the cotangent is not the g predicted in the forward pass (beyond float32
            # rounding), the difference's weight gradient is recomputed: exact either way
            err, scale = jnp.max(jnp.abs(c - g)), jnp.max(jnp.abs(g))
            def correct():
                if on_correction is not None:  # observe that the slow branch ran
                    jax.debug.callback(on_correction, err, scale)
                fix = backward(h, w_, y, lse, c - g)[1]
                return (dw.astype(jnp.float32) + fix.astype(jnp.float32)).astype(w_.dtype)

            dw = jax.lax.cond(err <= LOSS_GRAD_RTOL * scale, lambda: dw, correct)
        # entropy / top-K / TV / KL are outputs without a gradient (documented); integer ids,
        # mu's (frozen) inputs and the loss's per-token inputs get none either.
        return dh, dw, None, None, None, None, None

    head.defvjp(head_fwd, head_bwd)
    out = head(hidden, w, targets, mu_hidden, mu_w, topk_ids, extras)
    return {k: (v if k == "logp" else jax.lax.stop_gradient(v)) for k, v in out.items()}


def log_softmax_terms(logits, targets):
    """The plain head's terms from full logits [..., V] (any float dtype; a float32 log_softmax is
    taken) and targets [...] int: (log pi [..., V], log pi(targets) [...], entropy [...]).
    log pi(y) = z_y - logsumexp(z); H = -sum_v pi(v) log pi(v). The reference of fused_head."""
    logp_full = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logp = jnp.take_along_axis(logp_full, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_full) * logp_full, axis=-1)
    return logp_full, logp, entropy


def token_logp_and_entropy(logits, targets):
    """(log pi(targets) [...], entropy [...]) float32 from full logits: ``log_softmax_terms``."""
    return log_softmax_terms(logits, targets)[1:]


def plain_head(hidden, w, targets, *, w_vocab_axis: int = 1, mu_hidden=None, mu_w=None,
               topk_ids=None, temperature: float = 1.0) -> dict:
    """The reference: full [..., V] float32 logits, log_softmax, sums. Same outputs as fused_head
    (including which are differentiated); memory O(tokens x vocab)."""
    def logits(h, w_):
        dtype = jnp.result_type(h, w_)
        sub = "...e,ve->...v" if w_vocab_axis == 0 else "...e,ev->...v"
        return jnp.einsum(sub, h.astype(dtype), w_.astype(dtype),
                          preferred_element_type=jnp.float32) / temperature

    z = logits(hidden, w)
    lp, logp, entropy = log_softmax_terms(z, targets)
    sg = jax.lax.stop_gradient
    out = {"logp": logp, "entropy": sg(entropy)}
    if topk_ids is not None:
        out["topk_logp"] = sg(jnp.take_along_axis(lp, topk_ids.astype(jnp.int32), axis=-1))
    if mu_hidden is not None:
        z_mu, z = sg(logits(mu_hidden, mu_w)), sg(z)
        out["tv"], out["kl"] = divergences.full_tv(z_mu, z), divergences.full_kl(z_mu, z)
    return out
