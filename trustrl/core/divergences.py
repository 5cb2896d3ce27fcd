"""Token-level divergences D(mu(.|s_t) || pi(.|s_t)) between the rollout policy mu and pi.

Three estimates, all lower bounds of the exact divergence (any partition of the vocabulary
can only merge probability mass; triangle inequality for TV, log-sum inequality for KL):

    binary  <=  top-K  <=  exact (full vocabulary)

* binary (PAPER Eq. 13 / 14): the vocabulary collapsed to {sampled token, everything else};
  needs only the sampled token's log-prob under mu and pi.
* top-K (Eq. 15 / 16): mu's K most likely tokens (sampled token forced in) plus one "other"
  bucket; needs mu's top-K ids / log-probs from the sampler and pi's log-probs at those ids.
* exact: full-vocabulary TV / KL(mu || pi) from two logits arrays whose vocabulary axis may be
  sharded over a mesh axis; reduced with psum / pmax, the vocabulary is never gathered.

Everything is computed in float32 (or wider if the inputs are wider). ``1 - p`` is computed as
``-expm1(log p)``: in fp32, ``1 - exp(logp)`` loses ~40% of its value at p = 1 - 1e-7. Rest
masses are clamped at ``MIN_MASS`` before taking logs.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

MIN_MASS = 1e-12


def _f32(x):
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize >= 4 else x.astype(
        jnp.float32)


def _log1mexp_parts(logp):
    """(p, 1 - p, log(1 - p)) for logp <= 0, sharing the transcendentals."""
    logp = jnp.minimum(_f32(logp), 0.0)
    p, rest = jnp.exp(logp), -jnp.expm1(logp)
    # log(-expm1(x)) near 0 and log1p(-exp(x)) in the tail (Maechler 2012); clamped so that a
    # rest mass of exactly 0 gives log(MIN_MASS) rather than -inf.
    log_rest = jnp.where(logp > -0.6931472, jnp.log(rest), jnp.log1p(-p))
    return p, rest, jnp.maximum(log_rest, math.log(MIN_MASS))


def log1mexp(logp):
    """log(1 - exp(logp)) for logp <= 0, accurate at both ends, clamped at log(MIN_MASS)."""
    return _log1mexp_parts(logp)[2]


# --------------------------------------------------------------------------- binary (Eq. 13/14)

def binary_tv(logp, rollout_logp):
    """Binary TV (Eq. 13): |mu(a_t) - pi(a_t)|, the TV of the two-bucket partition. [B, T]."""
    return jnp.abs(jnp.exp(_f32(logp)) - jnp.exp(_f32(rollout_logp)))


def binary_kl(logp, rollout_logp):
    """Binary KL(mu || pi) (Eq. 14) at the sampled token. [B, T].

    mu log(mu / pi) + (1 - mu) log((1 - mu) / (1 - pi)), rollout distribution first.
    """
    logp, lmu = _f32(logp), _f32(rollout_logp)
    mu, rest_mu, log_rest_mu = _log1mexp_parts(lmu)
    kl = mu * (lmu - logp) + rest_mu * (log_rest_mu - log1mexp(logp))
    return jnp.maximum(kl, 0.0)  # rounding can give -1e-9 for identical inputs


# ------------------------------------------------------------------------------ top-K (Eq. 15/16)

TOPK_ALGORITHMS = ("lax", "chunked")
TOPK_CHUNK = 128  # vocabulary chunk of the chunked top-K (benchmarks/topk_record.py)


def top_k(x, k: int, method: str = "chunked", chunk: int = TOPK_CHUNK):
    """Exact top-K over the last axis: (values [..., K], ids [..., K] int32), decreasing, ties
    towards the lower id, as jax.lax.top_k. method "lax": jax.lax.top_k over the whole row;
    "chunked": the row in chunks of ``chunk`` ids, each chunk's maximum (one reduction pass),
    the K chunks with the largest maxima (lax.top_k over the chunk maxima), then lax.top_k
    over those K chunks' ids only. Exact: if a chunk holds a top-K element x but is not among
    the K best chunks, K other chunks rank before it, each holding an element that ranks
    before x (larger, or equal with a lower id: chunks are id-ordered and ties between chunk
    maxima go to the lower chunk), so x would not be in the top K. The chosen chunks are
    gathered in id order, so ties resolve as lax.top_k's. XLA:CPU's TopK over a whole
    151,936-id row is slow: in a 64-step decode loop at [32, 151,936], lax.top_k took ~1 s a
    step, top-K within 8,192-id chunks 25.6 ms, this 6.3 ms (benchmarks/topk_record.py)."""
    if method not in TOPK_ALGORITHMS:
        raise ValueError(f"unknown top-K method {method!r}; choose one of {TOPK_ALGORITHMS}")
    vocab = x.shape[-1]
    n = -(-vocab // chunk)
    if method == "lax" or n <= k:
        vals, ids = jax.lax.top_k(x, k)
        return vals, ids.astype(jnp.int32)
    pad = n * chunk - vocab
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=-jnp.inf)
    tiles = x.reshape(*x.shape[:-1], n, chunk)
    best = jnp.sort(jax.lax.top_k(tiles.max(axis=-1), k)[1], axis=-1)  # [..., K] chunk ids
    cand = jnp.take_along_axis(tiles, best[..., None], axis=-2)  # [..., K, chunk]
    vals, pos = jax.lax.top_k(cand.reshape(*x.shape[:-1], k * chunk), k)
    ids = jnp.take_along_axis(best, pos // chunk, axis=-1) * chunk + pos % chunk
    return vals, ids.astype(jnp.int32)


def build_topk_set(logp_full, sampled_ids, k: int, method: str = "chunked",
                   chunk: int = TOPK_CHUNK):
    """mu's K-set with the sampled token forced in.

    Args:
      logp_full: [..., V] log-probs of the sampling distribution mu.
      sampled_ids: [...] sampled token ids.
      k: set size, 1 <= k <= V.
      method, chunk: how the exact top-K is found (``top_k``; the same result).
    Returns:
      (ids [..., K] int32, logp [..., K]) sorted by decreasing mu, except that when the sampled
      token is not among the top K it overwrites the LAST slot (the reference code's rule).
    """
    vocab = logp_full.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-K size k={k} must be in [1, vocab_size={vocab}]")
    top_logp, top_ids = top_k(logp_full, k, method, chunk)
    sampled_ids = sampled_ids.astype(jnp.int32)
    sampled_logp = jnp.take_along_axis(logp_full, sampled_ids[..., None], axis=-1)[..., 0]
    return force_sampled(top_ids, top_logp, sampled_ids, sampled_logp)


def force_sampled(top_ids, top_logp, sampled_ids, sampled_logp):
    """The K-set rule on a plain top-K: (ids, logp [..., K]) with the sampled token (id and
    log-prob [...]) written into the LAST slot where it is not among the K. The sampler
    records the plain top-K inside its decode loop and applies this once to the whole
    [B, N, K] record afterwards (applied per step, XLA:CPU made each decode step up to 2.4x
    slower; benchmarks/rollout_engine.py table 2)."""
    present = jnp.any(top_ids == sampled_ids[..., None], axis=-1)
    last_ids = jnp.where(present, top_ids[..., -1], sampled_ids)
    last_logp = jnp.where(present, top_logp[..., -1], sampled_logp)
    return (jnp.concatenate([top_ids[..., :-1], last_ids[..., None]], axis=-1),
            jnp.concatenate([top_logp[..., :-1], last_logp[..., None]], axis=-1))


def gather_logp(logits, ids):
    """log softmax(logits) at ``ids``: [..., V], [..., K] -> [..., K] in float32.

    Used by the train step to evaluate pi at mu's top-K ids.
    """
    logits = _f32(logits)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    return jnp.take_along_axis(logits, ids.astype(jnp.int32), axis=-1) - lse


def set_logsumexp(logp):
    """logsumexp over the last axis, accurate when the result is near 0 (a K-set holding nearly
    all the mass): m + log1p(sum of the other entries' exp(x - m)), m the largest entry. The
    usual m + log(sum) rounds the sum (~1) to float32's 6e-8 resolution, so a rest mass below
    ~1e-7 came out as exactly 0 (and the top-K KL's 'other' term then used MIN_MASS: a
    spurious other_mu * log(other_mu / 1e-12)). The gradient is the softmax, as logsumexp's:
    m is a stop-gradient constant and the largest entry enters through expm1(x_max - m)."""
    logp = _f32(logp)
    m = jax.lax.stop_gradient(jnp.max(logp, axis=-1, keepdims=True))
    first = jax.nn.one_hot(jnp.argmax(logp, axis=-1), logp.shape[-1], dtype=bool)
    d = logp - m
    rest = jnp.sum(jnp.where(first, 0.0, jnp.exp(d)), axis=-1)
    own = jnp.sum(jnp.where(first, jnp.expm1(d), 0.0), axis=-1)  # 0, carrying d/dx_max
    return m[..., 0] + jnp.log1p(own + rest)


def _bucket_probs(topk_logp):
    """Probabilities of the K-set tokens and of the 'other' bucket, both >= 0. ([..,K], [..])."""
    topk_logp = _f32(topk_logp)
    probs = jnp.exp(topk_logp)
    set_lse = set_logsumexp(topk_logp)
    other = jnp.maximum(-jnp.expm1(jnp.minimum(set_lse, 0.0)), 0.0)
    return probs, other, set_lse


def topk_tv(logp_at_ids, rollout_topk_logp):
    """Top-K TV (Eq. 15): 1/2 sum over the K-set and the 'other' bucket of |p_mu - p_pi|.

    Args:
      logp_at_ids: [B, T, K] current policy log-probs at mu's top-K ids.
      rollout_topk_logp: [B, T, K] mu's log-probs at the same ids.
    Returns: [B, T].
    """
    p_pi, other_pi, _ = _bucket_probs(logp_at_ids)
    p_mu, other_mu, _ = _bucket_probs(rollout_topk_logp)
    return 0.5 * (jnp.sum(jnp.abs(p_mu - p_pi), axis=-1) + jnp.abs(other_mu - other_pi))


def topk_kl(logp_at_ids, rollout_topk_logp):
    """Top-K KL(mu || pi) (Eq. 16) over the K-set plus the 'other' bucket. [B, T]."""
    lpi, lmu = _f32(logp_at_ids), _f32(rollout_topk_logp)
    _, other_mu, lse_mu = _bucket_probs(lmu)
    _, _, lse_pi = _bucket_probs(lpi)
    log_other_mu = log1mexp(lse_mu)
    log_other_pi = log1mexp(lse_pi)
    kl = jnp.sum(jnp.exp(lmu) * (lmu - lpi), axis=-1) + other_mu * (log_other_mu - log_other_pi)
    return jnp.maximum(kl, 0.0)


# ------------------------------------------------------------------------- exact (full vocabulary)

def _full_local(logits_mu, logits_pi, kind: str, axis_name):
    """Per-shard body. With axis_name=None it is the plain single-device computation."""

    def reduce_sum(x):
        x = jnp.sum(x, axis=-1)
        return x if axis_name is None else jax.lax.psum(x, axis_name)

    def lse(x):
        # The max is only a shift for stability: stop_gradient keeps the whole thing
        # differentiable even though pmax has no derivative rule.
        m = jax.lax.stop_gradient(jnp.max(x, axis=-1))
        if axis_name is not None:
            m = jax.lax.pmax(m, axis_name)
        return m + jnp.log(reduce_sum(jnp.exp(x - m[..., None])))

    lmu = logits_mu - lse(logits_mu)[..., None]
    lpi = logits_pi - lse(logits_pi)[..., None]
    if kind == "tv":
        return 0.5 * reduce_sum(jnp.abs(jnp.exp(lmu) - jnp.exp(lpi)))
    return jnp.maximum(reduce_sum(jnp.exp(lmu) * (lmu - lpi)), 0.0)


def _full(logits_mu, logits_pi, kind, mesh, vocab_axis, batch_axes):
    if logits_mu.shape != logits_pi.shape:
        raise ValueError(f"logits shapes differ: mu {logits_mu.shape} vs pi {logits_pi.shape}")
    logits_mu, logits_pi = _f32(logits_mu), _f32(logits_pi)
    if mesh is None:
        return _full_local(logits_mu, logits_pi, kind, None)
    if vocab_axis not in mesh.axis_names:
        raise ValueError(f"vocab_axis {vocab_axis!r} not in mesh axes {mesh.axis_names}")
    vocab = logits_mu.shape[-1]
    if vocab % mesh.shape[vocab_axis]:
        raise ValueError(f"vocab size {vocab} not divisible by mesh axis "
                         f"{vocab_axis}={mesh.shape[vocab_axis]}")
    lead = [None] * (logits_mu.ndim - 1)
    batch_axes = tuple(a for a in (batch_axes or ()) if a in mesh.axis_names)
    if batch_axes and logits_mu.shape[0] % math.prod(mesh.shape[a] for a in batch_axes) == 0:
        lead[0] = batch_axes
    in_spec = P(*lead, vocab_axis)
    out_spec = P(*lead)
    fn = jax.shard_map(functools.partial(_full_local, kind=kind, axis_name=vocab_axis),
                       mesh=mesh, in_specs=(in_spec, in_spec), out_specs=out_spec)
    return fn(logits_mu, logits_pi)


def full_tv(logits_mu, logits_pi, *, mesh=None, vocab_axis="tensor", batch_axes=("data", "fsdp")):
    """Exact TV(mu, pi) = 1/2 sum_v |mu_v - pi_v| from logits [..., V] -> [...].

    With a mesh, the vocabulary axis is split over ``vocab_axis`` and the leading (batch) axis
    over ``batch_axes`` when divisible; logsumexp and the sums are psum/pmax reductions, so no
    device ever holds the full vocabulary of a token.
    """
    return _full(logits_mu, logits_pi, "tv", mesh, vocab_axis, batch_axes)


def full_kl(logits_mu, logits_pi, *, mesh=None, vocab_axis="tensor", batch_axes=("data", "fsdp")):
    """Exact KL(mu || pi) = sum_v mu_v (log mu_v - log pi_v) from logits [..., V] -> [...]."""
    return _full(logits_mu, logits_pi, "kl", mesh, vocab_axis, batch_axes)


DIVERGENCES = {
    "binary_tv": binary_tv,
    "binary_kl": binary_kl,
    "topk_tv": topk_tv,
    "topk_kl": topk_kl,
    "full_tv": full_tv,
    "full_kl": full_kl,
}
