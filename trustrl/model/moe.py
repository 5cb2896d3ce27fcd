"""Mixture-of-experts math (Qwen3-MoE, Hugging Face ``Qwen3MoeSparseMoeBlock``): routing, the
experts as a grouped matmul, the load-balancing loss and load statistics. Pure functions of
arrays; the Flax layer that owns the parameters is ``transformer.MoeMlp``.

Routing (per token, in float32 whatever the compute dtype: the authors' ``moe_router_dtype=fp32``):

    p = softmax(x @ W_router)          [X experts]
    ids, w = top_k(p, k)               w renormalised to sum 1 when norm_topk_prob
    y = sum_j w_j * down_e(silu(gate_e(x)) * up_e(x)),   e = ids_j

Rollout routing replay (R3): the experts come from the rollout engine (``ids`` recorded by the
sampler) and the weights from THIS router's softmax at those ids, renormalised the same way
(``replayed_weights``), so the router keeps its gradient. Gathering the weights from the top-k
values of another routing (or stopping their gradient) would silently zero it.

Experts (``experts``): "ragged" sorts the N * k (token, expert) pairs by expert and runs each
projection as one ``jax.lax.ragged_dot`` (dropless: no token is dropped); "dense" is the
reference that runs every expert on every token and weights the results with the [N, X] gate
matrix; "capacity" gives every expert a fixed buffer of ``capacity`` rows (fixed shapes; pairs
past an expert's capacity are dropped, counted by ``dropped``).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLS = ("ragged", "dense", "capacity")


def router_probs(x, w_router):
    """Routing probabilities [N, X] float32 from hidden states [N, E] and the router [E, X]."""
    logits = jnp.dot(x.astype(jnp.float32), w_router.astype(jnp.float32),
                     preferred_element_type=jnp.float32)
    return jax.nn.softmax(logits, axis=-1)


def _normalise(w, norm_topk_prob: bool):
    return w / jnp.sum(w, axis=-1, keepdims=True) if norm_topk_prob else w


def route(probs, k: int, norm_topk_prob: bool):
    """(weights [N, k] float32, ids [N, k] int32): the k most probable experts per token."""
    w, ids = jax.lax.top_k(probs, k)
    return _normalise(w, norm_topk_prob), ids.astype(jnp.int32)


def replayed_weights(probs, ids, norm_topk_prob: bool):
    """The gate weights [N, k] of recorded experts ``ids`` [N, k] under this router's ``probs``:
    differentiable in ``probs`` (R3 keeps the router's gradient)."""
    w = jnp.take_along_axis(probs, ids.astype(jnp.int32), axis=-1)
    return _normalise(w, norm_topk_prob)


def _swiglu(x, w_gate, w_up, w_down, dtype):
    """Every expert's SwiGLU on its rows: x [X, M, E] (or [1, M, E]: the same rows for all)
    -> [X, M, E] float32 (float32 accumulation)."""
    x = jnp.broadcast_to(x, (w_gate.shape[0],) + x.shape[1:]).astype(dtype)
    h = jnp.einsum("xme,xef->xmf", x, w_gate, preferred_element_type=jnp.float32)
    u = jnp.einsum("xme,xef->xmf", x, w_up, preferred_element_type=jnp.float32)
    a = (jax.nn.silu(h) * u).astype(dtype)
    return jnp.einsum("xmf,xfe->xme", a, w_down, preferred_element_type=jnp.float32)


def _ragged(x, ids, weights, w_gate, w_up, w_down, dtype):
    n, k = ids.shape
    num_experts = w_gate.shape[0]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # the (token, slot) pairs grouped by expert
    xs = jnp.take(x, order // k, axis=0).astype(dtype)
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)

    def mm(a, w):
        return jax.lax.ragged_dot(a, w, sizes, preferred_element_type=jnp.float32)

    a = (jax.nn.silu(mm(xs, w_gate)) * mm(xs, w_up)).astype(dtype)
    ys = mm(a, w_down)  # [N * k, E] float32, expert-sorted
    y = jnp.take(ys, jnp.argsort(order), axis=0).reshape(n, k, -1)  # back to token order
    return jnp.einsum("nke,nk->ne", y, weights.astype(jnp.float32))


def _dense(x, ids, weights, w_gate, w_up, w_down, dtype):
    num_experts = w_gate.shape[0]
    gates = jnp.einsum("nkx,nk->nx", jax.nn.one_hot(ids, num_experts, dtype=jnp.float32),
                       weights.astype(jnp.float32))  # [N, X], zero off the chosen experts
    y = _swiglu(x.astype(dtype)[None], w_gate, w_up, w_down, dtype)  # [X, N, E]
    return jnp.einsum("xne,nx->ne", y, gates)


def capacity(num_tokens: int, k: int, num_experts: int, factor: float) -> int:
    """Rows per expert in "capacity" mode: ceil(factor * N * k / X) (at least 1)."""
    return max(1, math.ceil(factor * num_tokens * k / num_experts))


def _slots(ids, num_experts: int, cap: int):
    """Each (token, slot) pair's row in its expert's buffer, and whether it fits (first come,
    first served in token order)."""
    flat = ids.reshape(-1)
    one_hot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)
    row = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)
    return flat, row, row < cap


def _capacity(x, ids, weights, w_gate, w_up, w_down, dtype, cap):
    n, k = ids.shape
    num_experts, e = w_gate.shape[0], x.shape[-1]
    flat, row, keep = _slots(ids, num_experts, cap)
    tok = jnp.arange(n * k) // k
    # dropped pairs are sent to a scratch row past the end and never read back
    dest = jnp.where(keep, flat * cap + row, num_experts * cap)
    buf = jnp.zeros((num_experts * cap + 1, e), dtype).at[dest].set(x[tok].astype(dtype))
    y = _swiglu(buf[:-1].reshape(num_experts, cap, e), w_gate, w_up, w_down, dtype)
    y = jnp.concatenate([y.reshape(num_experts * cap, e), jnp.zeros((1, e), y.dtype)])
    pair = jnp.take(y, dest, axis=0) * (weights.reshape(-1) * keep)[:, None]
    return pair.reshape(n, k, e).sum(axis=1)


def experts(x, ids, weights, w_gate, w_up, w_down, *, impl: str = "ragged", dtype=None,
            capacity_rows: int = 0):
    """sum_j weights[:, j] * expert_{ids[:, j]}(x): [N, E] float32.

    x [N, E]; ids, weights [N, k]; w_gate, w_up [X, E, F]; w_down [X, F, E]. ``dtype``: the
    matmuls' input dtype (default x's); products accumulate in float32. ``capacity_rows``:
    the per-expert buffer of impl="capacity"."""
    if impl not in IMPLS:
        raise ValueError(f"unknown MoE implementation {impl!r}; valid: {IMPLS}")
    dtype = x.dtype if dtype is None else jnp.dtype(dtype)
    if impl == "ragged":
        return _ragged(x, ids, weights, w_gate, w_up, w_down, dtype)
    if impl == "dense":
        return _dense(x, ids, weights, w_gate, w_up, w_down, dtype)
    if capacity_rows < 1:
        raise ValueError(f"impl='capacity' needs capacity_rows >= 1, got {capacity_rows}")
    return _capacity(x, ids, weights, w_gate, w_up, w_down, dtype, capacity_rows)


def dropped(ids, num_experts: int, cap: int, mask=None):
    """Fraction of (token, slot) pairs past their expert's capacity (over ``mask``ed tokens)."""
    _, _, keep = _slots(ids, num_experts, cap)
    m = jnp.ones(ids.shape, jnp.float32) if mask is None else jnp.broadcast_to(
        mask.reshape(-1, 1).astype(jnp.float32), ids.shape)
    return jnp.sum((~keep).astype(jnp.float32) * m.reshape(-1)) / jnp.maximum(jnp.sum(m), 1.0)


def load_sums(probs, ids, mask):
    """Per-expert sums of one layer over its valid tokens: (top-k assignments [X], routing
    probability [X], valid tokens []): what ``load_balancing_loss`` and ``load_stats`` reduce.
    probs [N, X]; ids [N, k]; mask [N]."""
    m = mask.reshape(-1).astype(jnp.float32)
    num_experts = probs.shape[-1]
    counts = jnp.einsum("nkx,n->x", jax.nn.one_hot(ids, num_experts, dtype=jnp.float32), m)
    return counts, jnp.einsum("nx,n->x", probs.astype(jnp.float32), m), jnp.sum(m)


def load_balancing_loss(counts, prob_sums, tokens):
    """Hugging Face's ``load_balancing_loss_func`` (Switch Transformer eq. 4-6) from the sums of
    ``load_sums`` added over every MoE layer: X * sum_x (counts_x / T) * (prob_sums_x / T),
    T the valid tokens of all layers together."""
    num_experts = counts.shape[-1]
    t = jnp.maximum(tokens, 1.0)
    return num_experts * jnp.sum((counts / t) * (prob_sums / t))


def load_stats(counts, tokens, k: int) -> dict:
    """Max and mean tokens per expert of one layer, and max / mean (1: perfectly balanced)."""
    mean = tokens * k / counts.shape[-1]
    mx = jnp.max(counts)
    return {"max": mx, "mean": mean, "imbalance": mx / jnp.maximum(mean, 1e-9)}
