"""Continuous batching: a fixed number of decode slots, refilled as rows finish.

RL response lengths are long-tailed (most rows stop early, a few run to the cap). Decoding a
batch of rows until its longest row ends spends most decode steps on rows that already
stopped; here a finished row's slot takes the next pending row instead, so the number of
decode steps follows the total number of generated tokens, not rows x the longest row.

One jitted program, fixed shapes, no host round trips:

    prefill the first S rows into the [S, P + N] KV cache (S = slots, P = prompt bucket,
    N = max_new_tokens)
    while a slot is live or a row is pending:
        sample every slot's next token; write it at (its row, its step) of the output buffers
        decode one step for all S slots (a finished or idle slot's result is discarded)
        if enough slots are free (>= min(R, rows pending)): prefill up to R pending rows in one
        [R, P] call and insert their keys / values into the free slots (transformer.insert_rows)

Each slot is a ring of P + N cache columns: the shared write column wraps, a refilled row's
prompt goes just before it and its tokens follow, at most P + N columns before it ends.
Decode attention uses validity alone (keys carry their RoPE positions), so a row decodes as
if it had been prefilled alone: greedy outputs equal one-row-at-a-time generation (tested).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from trustrl.rollout.record import FINISH_EOS, FINISH_LENGTH


class _State(NamedTuple):
    logits: jax.Array      # [S, V] next-token logits of each slot
    cache: Any
    key: jax.Array
    row: jax.Array         # [S] the output row a slot decodes
    step: jax.Array        # [S] tokens it has generated so far
    pos: jax.Array         # [S] RoPE position of its next token
    live: jax.Array        # [S] bool
    next_row: jax.Array    # scalar: the first row not yet started
    out: tuple             # tokens, mask, logp [R, N]; topk ids / logp [R, N, K]; finish [R]
    routes: Any = None     # [R, P + N, M, k] routed experts (``routes`` given), else None


# The refill's cache writes are unrolled per row (transformer.insert_rows: rows x layers x 4 small
# in-place updates), so the compiled program grows with the rows per refill: measured on this
# 2-core VM, the Qwen3-0.6B sampler of configs/qwen3_tpu.py (512 slots, 512 + 2,048 tokens)
# compiled for v5p in 162 s at 8 rows per refill and 755 s at 64 (and Qwen3-8B's ran out of the
# VM's 24 GiB at 64). The automatic refill size stops at this many rows.
AUTO_REFILL_MAX = 8


def refill_rows(slots: int, refill: int) -> int:
    """Rows prefilled per refill (0 = auto: an eighth of the slots, at least 1, at most
    AUTO_REFILL_MAX)."""
    return min(slots, refill or min(AUTO_REFILL_MAX, max(1, slots // 8)))


def generate(params, prompt_tokens, prompt_mask, num_rows, cache, key, *, model,
             max_new_tokens: int, eos_ids: tuple, refill: int, next_token: Callable,
             record_topk: Callable | None, topk: int, routes: tuple | None = None):
    """Continuous-batching generation of ``num_rows`` (traced) rows of ``prompt_tokens``.

    Args:
      prompt_tokens, prompt_mask: [R, P] left-padded prompts; rows >= num_rows are padding
        (never started; their outputs stay empty).
      cache: a [S, ., P + N, .] KV cache from ``model.init_cache``; S slots.
      next_token: (logits [S, V], key) -> (tokens [S], their log mu [S], log mu [S, V]).
      record_topk: log mu [S, V] -> (ids [S, K], log mu [S, K]) (the plain top-K), or None.
      routes: (M, k, dtype): record the routed experts (R3) with ``model.prefill_routes`` /
        ``decode_routes`` into a [R, P + N, M, k] buffer: a row's prompt columns at its
        prefill (first batch or refill), its response column t when a decode step consumes
        token t < N - 1; or None.
    Returns:
      ((tokens, mask, logp, topk_ids, topk_logp, finish, routes or None), cache) in the layout
      of ``sampler._generate``.
    """
    n_rows, p = prompt_tokens.shape
    s = jax.tree.leaves(cache)[0].shape[0]
    n, k, r = max_new_tokens, max(topk, 1), refill_rows(s, refill)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    lengths = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

    first = jnp.minimum(jnp.arange(s), n_rows - 1)
    live = jnp.arange(s) < num_rows
    buf = None
    if routes is None:
        logits, cache = model.prefill(params, prompt_tokens[first], positions[first],
                                      prompt_mask[first], cache)
    else:
        m, kk, dtype = routes
        logits, cache, ids = model.prefill_routes(params, prompt_tokens[first], positions[first],
                                                  prompt_mask[first], cache)
        buf = _put_prompts(jnp.zeros((n_rows, p + n, m, kk), dtype), jnp.where(
            live, first, n_rows), ids, prompt_mask[first])
    out = (jnp.zeros((n_rows, n), jnp.int32), jnp.zeros((n_rows, n), jnp.int32),
           jnp.zeros((n_rows, n), jnp.float32), jnp.zeros((n_rows, n, k), jnp.int32),
           jnp.zeros((n_rows, n, k), jnp.float32), jnp.full((n_rows,), FINISH_LENGTH, jnp.int32))
    init = _State(logits, cache, key, jnp.arange(s, dtype=jnp.int32), jnp.zeros((s,), jnp.int32),
                  lengths[first], live, jnp.minimum(num_rows, s).astype(jnp.int32), out, buf)

    def prefill(rows):
        args = (params, prompt_tokens[rows], positions[rows], prompt_mask[rows],
                model.init_cache(r, p))
        if routes is None:
            return (*model.prefill(*args), None)
        return model.prefill_routes(*args)

    def start(st: _State):
        """Prefills up to R pending rows for the lowest free slots: (the state without its
        cache, the rows' [R, ., P, .] cache, the slots they go to (s = none), the rows they
        decode (n_rows = none), the prefill's routed experts [R, P, M, k] or None)."""
        free_first = jnp.argsort(st.live.astype(jnp.int32), stable=True)[:r]
        count = jnp.minimum(jnp.minimum(r, jnp.sum(~st.live)), num_rows - st.next_row)
        use = jnp.arange(r) < count
        slots = jnp.where(use, free_first, s)  # slot s: out of range, the write is dropped
        rows = jnp.minimum(st.next_row + jnp.arange(r), n_rows - 1)
        lg, new, ids = prefill(rows)
        put = lambda buf, val: buf.at[slots].set(val, mode="drop")
        return (st._replace(logits=put(st.logits, lg), row=put(st.row, rows),
                            step=put(st.step, 0), pos=put(st.pos, lengths[rows]),
                            live=put(st.live, True), next_row=st.next_row + count),
                new, slots, jnp.where(use, rows, n_rows), ids)

    def skip(st: _State):
        ids = None if routes is None else jnp.zeros((r, p, routes[0], routes[1]), jnp.int32)
        return (st, model.init_cache(r, p), jnp.full((r,), s, jnp.int32),
                jnp.full((r,), n_rows, jnp.int32), ids)

    def body(st: _State) -> _State:
        key, sub = jax.random.split(st.key)
        tok, tok_logp, logp_full = next_token(st.logits, sub)
        row = jnp.where(st.live, st.row, n_rows)  # finished / idle slots write nothing
        put = lambda buf, val: buf.at[row, st.step].set(val, mode="drop")
        tokens, mask, logp, topk_ids, topk_logp, finish = st.out
        tokens, mask, logp = put(tokens, tok), put(mask, 1), put(logp, tok_logp)
        if record_topk is not None:
            ids, lp = record_topk(logp_full)
            topk_ids, topk_logp = put(topk_ids, ids), put(topk_logp, lp)
        hit_eos = jnp.any(tok[:, None] == eos[None, :], axis=-1)
        ended = st.live & (hit_eos | (st.step + 1 >= n))
        finish = finish.at[jnp.where(ended, st.row, n_rows)].set(
            jnp.where(hit_eos, FINISH_EOS, FINISH_LENGTH).astype(jnp.int32), mode="drop")
        buf = st.routes
        if routes is None:
            logits, cache = model.decode(params, jnp.where(st.live, tok, 0), st.pos, st.cache)
        else:  # the consumed token's experts: response column `step` unless it is the last
            logits, cache, ids = model.decode_routes(params, jnp.where(st.live, tok, 0), st.pos,
                                                     st.cache)
            keep = st.live & (st.step < n - 1)
            buf = buf.at[jnp.where(keep, st.row, n_rows), p + st.step].set(
                ids.astype(buf.dtype), mode="drop")
        live = st.live & ~ended
        st = st._replace(logits=logits, cache=cache, key=key, step=st.step + 1, pos=st.pos + 1,
                         live=live, out=(tokens, mask, logp, topk_ids, topk_logp, finish),
                         routes=buf)
        pending = num_rows - st.next_row
        go = (pending > 0) & (jnp.sum(~live) >= jnp.minimum(r, pending))
        # the cache stays outside the cond (a cond that may pass it through unchanged made XLA
        # copy it); the refill's writes then go in place, dropped when nothing was prefilled
        # so does the routes buffer: the refilled rows' prompt ids are written after it
        small, new, slots, rows, ids = jax.lax.cond(go, start, skip,
                                                    st._replace(cache=None, routes=None))
        if routes is not None:
            buf = _put_prompts(buf, rows, ids, prompt_mask[jnp.minimum(rows, n_rows - 1)])
        return small._replace(cache=model.insert(st.cache, new, slots), routes=buf)

    def cond(st: _State):
        return jnp.any(st.live) | (st.next_row < num_rows)

    st = jax.lax.while_loop(cond, body, init)
    return (*st.out, st.routes), st.cache


def _put_prompts(buf, rows, ids, prompt_mask):
    """Writes a prefill's routed experts ids [R, P, M, k] into rows ``rows`` [R] (>= the
    buffer's rows: dropped) of ``buf`` [rows, P + N, M, k], prompt columns only, left padding
    0."""
    p = ids.shape[1]
    ids = jnp.where(prompt_mask[:, :, None, None] > 0, ids, 0).astype(buf.dtype)
    return buf.at[rows, :p].set(ids, mode="drop")
