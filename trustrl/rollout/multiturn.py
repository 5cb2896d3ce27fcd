"""Multi-turn rollouts, token-in-token-out, on one KV cache per episode.

Every episode is one row of a jitted decode loop. At each step a row

    GEN   samples its next token from mu (recorded: log-prob, top-K, response_mask 1), or
    WAIT  has ended its turn and waits for its environment (it writes nothing), or
    DONE  its episode is over.

The loop returns to the host once ``exit_fraction`` of the rows still playing wait (default 1.0:
when no row is generating; a waiting row never holds a generating one back, it only idles); a
small fraction returns as soon as one row waits. The host steps the environments of every
waiting row, and ONE jitted append writes all their observations (the environment's replies,
rendered with the template's turn markers and encoded once; response_mask 0) as a [B, Q] chunk
onto their KV caches, each row at its own next column, then the loop resumes on the same cache.
Nothing of an earlier turn is ever processed again (no re-prefill), and the policy's tokens are
never decoded and re-encoded (TokenEnv decodes them only to give the environment its text).

Cache: row-indexed (``transformer.row_indexed``): each row keeps its valid tokens compact at its
own columns, so a waiting or finished row, or a shorter observation, uses no column: the prompt
(compact from column 0), then the trajectory. The loop itself writes at ONE shared column per
step (a dynamic_update_slice, as the single-turn sampler: a per-row scatter cost XLA:CPU a copy
of every layer's cache per step), into the round region: the R = ``max_turn_tokens`` columns
after the longest row (rows that do not generate write an empty slot there). Decode attention
needs only validity (keys carry their RoPE positions), so where a token sits does not matter to
it. The next append (or ``_merge``) moves each row's round tokens to its own next columns, so
the rows stay compact; P + ``max_total_tokens`` + R columns. A loop call lasts at most R steps:
turns start only at appends, and every turn ends within ``max_turn_tokens``. Limits:
``max_turns`` policy turns, ``max_turn_tokens`` policy tokens per turn (the turn is then closed
by the template's end-of-turn token, a template token) and ``max_total_tokens`` trajectory
tokens after the prompt (policy and observation together).

Rows (``SamplerConfig.max_rows``; 0 = one per episode): a row whose episode ended takes the next
pending episode at the next host exit: its cache row is emptied and the new prompt appended in
the same chunk as the observations. Not supported here (an error): a mixture-of-experts rollout
that records its routing (R3).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trustrl.core import divergences
from trustrl.infra import sharding
from trustrl.model import transformer
from trustrl.rollout import sampler as sampler_lib, trajectory
from trustrl.rollout.sampler import SamplerConfig, check_int

GEN, WAIT, DONE = range(3)


@dataclasses.dataclass(frozen=True)
class MultiTurnConfig:
    max_turns: int = 4          # policy turns per episode
    max_turn_tokens: int = 16   # policy tokens per turn (its end-of-turn token included)
    max_total_tokens: int = 128  # trajectory tokens after the first prompt (policy + observations)
    min_obs_bucket: int = 8     # observation chunks are padded to powers of two from here
    # the loop returns to the host once this share of the rows still playing waits for its
    # environment: 1.0 = when no row generates; -> 0: as soon as one row waits
    exit_fraction: float = 1.0

    def __post_init__(self):
        for name, low in (("max_turns", 1), ("max_turn_tokens", 1), ("max_total_tokens", 1),
                          ("min_obs_bucket", 1)):
            check_int(name, getattr(self, name), low)
        f = self.exit_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ValueError(f"exit_fraction must be a number in (0, 1], got {f!r}")


class LoopState(NamedTuple):
    logits: jax.Array     # [B, V] next-token logits of each row
    cache: Any
    key: jax.Array
    step: jax.Array       # scalar: loop steps so far
    t: jax.Array          # [B] the next trajectory column of each row
    pos: jax.Array        # [B] the RoPE position of its next token
    mode: jax.Array       # [B] GEN / WAIT / DONE
    turn_len: jax.Array   # [B] policy tokens of the current turn
    turn_end: jax.Array   # [B] why the last turn ended (trajectory.TURN_ENDS index)
    cols: jax.Array       # [B] each row's next compact cache column (before the round region)
    tokens: jax.Array     # [B, N] trajectory tokens
    mask: jax.Array       # [B, N] 1 on policy tokens
    logp: jax.Array       # [B, N]
    topk_ids: jax.Array   # [B, N, K]
    topk_logp: jax.Array  # [B, N, K]


def _loop(params, s: LoopState, *, model, cfg: SamplerConfig, mt: MultiTurnConfig, eot: int):
    """Decodes every GEN row until the exit rule holds (``exit_fraction``)."""
    n = s.tokens.shape[1]
    eos = jnp.asarray(sorted({eot, *cfg.eos_ids}), jnp.int32)
    rows = jnp.arange(s.t.shape[0])

    def body(s: LoopState):
        key, sub = jax.random.split(s.key)
        sampled, lp, logp_full = sampler_lib.next_token(s.logits, sub, cfg)
        gen = s.mode == GEN
        tok = jnp.where(gen, sampled, 0)
        col = jnp.where(gen, s.t, n)  # out of range: dropped
        put = lambda buf, val: buf.at[rows, col].set(val.astype(buf.dtype), mode="drop")
        state = s._replace(tokens=put(s.tokens, tok), mask=put(s.mask, gen),
                           logp=put(s.logp, jnp.where(gen, lp, 0.0)))
        if cfg.record_topk:
            ids, vals = sampler_lib.record_topk(logp_full, cfg)
            state = state._replace(
                topk_ids=put(s.topk_ids, jnp.where(gen[:, None], ids, 0)),
                topk_logp=put(s.topk_logp, jnp.where(gen[:, None], vals, 0.0)))
        logits, cache = model.decode(params, tok, s.pos, s.cache, gen)
        t = s.t + gen
        turn_len = s.turn_len + gen
        eot_hit = gen & jnp.any(tok[:, None] == eos[None, :], axis=-1)
        full = gen & (t >= n)
        capped = gen & (turn_len >= mt.max_turn_tokens)
        ends = eot_hit | capped | full
        reason = jnp.where(eot_hit, 0, jnp.where(full, 2, 1))
        return state._replace(
            logits=jnp.where(gen[:, None], logits, s.logits), cache=cache, key=key,
            step=s.step + 1, t=t, pos=s.pos + gen, mode=jnp.where(ends, WAIT, s.mode),
            turn_len=turn_len, turn_end=jnp.where(ends, reason, s.turn_end))

    def cond(s: LoopState):
        gen, wait = jnp.sum(s.mode == GEN), jnp.sum(s.mode == WAIT)
        return (gen > 0) & (wait < mt.exit_fraction * (gen + wait))

    return jax.lax.while_loop(cond, body, s)


def _to_loop(cache, cols):
    """A row-indexed cache (each row's next column ``cols`` [B]) in the loop's layout: the
    shared write column is the round region's first, one past the longest row."""
    if not isinstance(cache, transformer.KVCache):
        return cache
    return cache._replace(index=jnp.max(cols).astype(jnp.int32))


def _from_loop(cache, cols, width: int):
    """The loop's cache back to row-indexed: each row's valid tokens of the round region
    (``width`` columns from max(cols)) moved to its own next columns, in order; -> (cache, new
    cols). The round's tokens are read before any is written, so a row whose own columns
    overlap the region (the longest) is moved correctly."""
    if not isinstance(cache, transformer.KVCache):
        return cache, cols
    start = jnp.max(cols).astype(jnp.int32)
    b, s = cache.valid.shape
    ok = jax.lax.dynamic_slice(cache.valid, (0, start), (b, width))
    rank = jnp.cumsum(ok, axis=1, dtype=jnp.int32) - ok
    dest = jnp.where(ok, cols[:, None] + rank, s)  # [B, R]; not a token: dropped
    valid = jax.lax.dynamic_update_slice(cache.valid, jnp.zeros_like(ok), (0, start))
    valid = valid.at[jnp.arange(b)[:, None], dest].set(True, mode="drop")

    def move(buf):  # buf [B, K, S, D]
        kh, d = buf.shape[1], buf.shape[3]
        src = jax.lax.dynamic_slice(buf, (0, 0, start, 0), (b, kh, width, d))
        return transformer.write_columns(buf, dest, src.transpose(0, 2, 1, 3))
    new_cols = (cols + jnp.sum(ok, axis=1, dtype=jnp.int32)).astype(cols.dtype)
    return cache._replace(k=tuple(map(move, cache.k)), v=tuple(map(move, cache.v)),
                          valid=valid, index=new_cols), new_cols


def _merge(s: LoopState, *, width: int) -> LoopState:
    """Moves the round region into the rows and starts a new one (a host exit with nothing to
    append while rows still generate)."""
    cache, cols = _from_loop(s.cache, s.cols, width)
    return s._replace(cache=_to_loop(cache, cols), cols=cols)


def _append(params, s: LoopState, chunk, valid, mode, reset, *, model, width: int):
    """Writes ``chunk`` [B, Q] (``valid``: the real ids, left-aligned) onto each row's cache at
    its own next columns in one forward; rows with a chunk take the logits after it. A chunk is
    an observation (also written into the row's trajectory, response_mask 0) or, for rows with
    ``reset`` [B], the first prompt of the row's next episode: the row's cache and trajectory
    are emptied first and the prompt goes to columns 0 .. L - 1 at positions 0 .. L - 1.
    ``mode``: every row's new mode (the host's decision); rows that waited start a new turn."""
    n = s.tokens.shape[1]
    rows = jnp.arange(s.t.shape[0])[:, None]
    cache, _ = _from_loop(s.cache, s.cols, width)
    if isinstance(cache, transformer.KVCache):
        cache = cache._replace(valid=jnp.where(reset[:, None], False, cache.valid),
                               index=jnp.where(reset, 0, cache.index))
    t, pos = jnp.where(reset, 0, s.t), jnp.where(reset, 0, s.pos)
    keep = lambda x: jnp.where(reset.reshape((-1,) + (1,) * (x.ndim - 1)), 0, x).astype(x.dtype)
    before = jnp.cumsum(valid, axis=1) - valid
    logits, cache = model.extend(params, chunk, pos[:, None] + before, valid, cache)
    has = jnp.any(valid > 0, axis=1)
    length = jnp.sum(valid, axis=1, dtype=jnp.int32)
    # each row's next compact cache column (a cache of another kind: its prompt + trajectory)
    cache_cols = (cache.index if isinstance(cache, transformer.KVCache)
                  else jnp.where(reset, 0, s.cols) + length)
    cols = jnp.where((valid > 0) & ~reset[:, None], t[:, None] + before, n)
    return s._replace(
        logits=jnp.where(has[:, None], logits, s.logits), cache=_to_loop(cache, cache_cols),
        cols=cache_cols,
        tokens=keep(s.tokens).at[rows, cols].set(chunk, mode="drop"), mask=keep(s.mask),
        logp=keep(s.logp), topk_ids=keep(s.topk_ids), topk_logp=keep(s.topk_logp),
        t=t + jnp.where(reset, 0, length), pos=pos + length, mode=mode,
        turn_len=jnp.where((s.mode == WAIT) | reset, 0, s.turn_len),
        turn_end=jnp.where(reset, 0, s.turn_end))


@functools.partial(jax.jit, static_argnums=1)
def _outputs(s: LoopState, topk: int):
    """The trajectory buffers, mu's top-K made K-sets (the sampled token forced in:
    divergences.build_topk_set's rule) and 0 off the policy tokens."""
    if not topk:
        return s.tokens, s.mask, s.logp, s.topk_ids, s.topk_logp
    ids, lp = divergences.force_sampled(s.topk_ids, s.topk_logp, s.tokens, s.logp)
    on = s.mask[..., None] > 0
    return s.tokens, s.mask, s.logp, jnp.where(on, ids, 0), jnp.where(on, lp, 0.0)


def _prefill(params, tokens, valid, *, model, length: int):
    """A new (row-indexed) cache of ``length`` columns with the prompts prefilled."""
    cache = model.init_cache(tokens.shape[0], length)
    if isinstance(cache, transformer.KVCache):  # each row writes at its own column
        cache = transformer.row_indexed(cache)
    positions = transformer.positions_from_mask(valid).astype(jnp.int32)
    return model.prefill(params, tokens, positions, valid, cache)


def _initial_state(logits, cache, key, valid, n: int, k: int) -> LoopState:
    """The loop's first state after the prefill: every row generating from its prompt's end,
    empty [B, N] trajectory buffers (top-K [B, N, K]), the cache in the loop's layout."""
    b = valid.shape[0]
    z = lambda *shape, dt=jnp.int32: jnp.zeros(shape, dt)
    cols = (cache.index if isinstance(cache, transformer.KVCache)
            else jnp.sum(valid, axis=1, dtype=jnp.int32))
    return LoopState(logits=logits, cache=_to_loop(cache, cols), key=key, step=jnp.int32(0),
                     cols=cols, t=z(b),
                     pos=jnp.asarray(valid.sum(1), jnp.int32), mode=jnp.full((b,), GEN),
                     turn_len=z(b), turn_end=z(b), tokens=z(b, n), mask=z(b, n),
                     logp=z(b, n, dt=jnp.float32), topk_ids=z(b, n, k),
                     topk_logp=z(b, n, k, dt=jnp.float32))


def obs_bucket(length: int, mt: MultiTurnConfig) -> int:
    return max(mt.min_obs_bucket, 1 << max(0, math.ceil(math.log2(max(length, 1)))))


def batch_layout(tree, batch_sharding):
    """NamedShardings for the leaves of ``tree``: each over its leading (row) axis like
    ``batch_sharding`` (sharding.batch_sharding), scalars replicated, and the KV cache's 4-D
    [rows, kv_heads, length, head_dim] keys / values also over the "tensor" mesh axis when it
    divides the kv heads: the single-turn Sampler's layout (Sampler.layout), for ``lower``."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh, axes = batch_sharding.mesh, batch_sharding.spec[0]
    tensor = mesh.shape.get("tensor", 1)

    def spec_of(x):
        if not x.ndim:
            return P()
        if x.ndim == 4 and tensor > 1 and x.shape[1] % tensor == 0:
            return P(axes, "tensor", None, None)
        return P(axes, *[None] * (x.ndim - 1))

    return jax.tree.map(lambda x: NamedSharding(mesh, spec_of(x)), tree)


@dataclasses.dataclass
class Counts:
    """What a call did: loop steps, host round trips, observation appends, prefill tokens,
    round-region moves without an append (an exit where rows still generate and the waiting
    ones ended with no episode pending)."""
    steps: int = 0
    exits: int = 0
    appends: int = 0
    prefill_tokens: int = 0
    merges: int = 0


class MultiTurnSampler:
    """Runs episodes of token environments (trustrl.data.environments.TokenEnv) with a policy.

    >>> mts = MultiTurnSampler(decode_model, SamplerConfig(record_topk=4), MultiTurnConfig())
    >>> rollout, traj = mts.run(params, [TokenEnv(...) for _ in range(B)], seeds, group_size, key)
    """

    def __init__(self, model, cfg: SamplerConfig, mt: MultiTurnConfig, *, batch_sharding=None):
        """``batch_sharding`` (sharding.batch_sharding(mesh)): the programs' per-row outputs
        (the KV cache, the loop state) are constrained to ``batch_layout`` (rows over the batch
        axes, kv heads over "tensor"); unconstrained, the compiler chose a replicated cache
        (Qwen3-1.7B on v5p: the whole cache on every chip). Row counts the batch axes do not
        divide run unconstrained."""
        cfg.validate(model.vocab_size)
        if cfg.record_routes:
            raise ValueError("multi-turn rollouts do not record routed experts (R3) yet; set "
                             "record_routes=False")
        if model.extend is None:
            raise ValueError("multi-turn rollouts append observations with DecodeModel.extend; "
                             "this model has none")
        self.model, self.cfg, self.mt = model, cfg, mt
        self.batch_sharding = batch_sharding
        self._prefill = jax.jit(self._constrained(functools.partial(_prefill, model=model)),
                                static_argnames="length")
        self.round_width = min(mt.max_turn_tokens, mt.max_total_tokens)  # R: see the module doc
        self._append = jax.jit(self._constrained(functools.partial(
            _append, model=model, width=self.round_width)), donate_argnums=(1,))
        self._merge = jax.jit(self._constrained(functools.partial(
            _merge, width=self.round_width)), donate_argnums=(0,))
        self._loops = {}
        self.counts = Counts()

    def _constrained(self, fn):
        """``fn`` with its outputs constrained to ``batch_layout`` (when sharded and the row
        count divides the batch axes)."""
        if self.batch_sharding is None:
            return fn
        shards = sharding.axis_size(self.batch_sharding.mesh, self.batch_sharding.spec[0])

        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            rows = jax.tree.leaves(out)[0].shape[0]
            if rows % shards:
                return out
            return jax.tree.map(jax.lax.with_sharding_constraint, out,
                                batch_layout(out, self.batch_sharding))
        return wrapped

    def _loop_fn(self, eot: int):
        if eot not in self._loops:
            self._loops[eot] = jax.jit(self._constrained(functools.partial(
                _loop, model=self.model, cfg=self.cfg, mt=self.mt, eot=eot)), donate_argnums=(1,))
        return self._loops[eot]

    def lower(self, params, rows: int, width: int, obs_len: int, batch_sharding, eot: int = 0):
        """The three programs ``run`` executes for ``rows`` episodes at prompt bucket ``width``,
        lowered on abstract arguments (``params`` may be ShapeDtypeStructs), every per-row
        argument sharded like the single-turn Sampler's (``batch_layout``: over
        ``batch_sharding``'s batch axes; the KV cache's keys / values also over "tensor"; the
        outputs as the sampler's ``batch_sharding`` constrains them):
        [(name, description, jax Lowered)] for

            prefill  the first prompts into a new row-indexed cache of width + max_total_tokens
                     + R columns (R: the round region, ``round_width``)
            loop     the decode loop (one token per GEN row per step) on the donated LoopState
            append   the round region moved into the rows, then one [rows, Q] observation /
                     prompt chunk, Q = obs_bucket(obs_len)

        The rows: min(rows, max_rows) as in ``run``. ``eot``: the end-of-turn id, a constant
        of the loop's stop test only (any id compiles the same program). For
        trustrl.tools.aot_check, which needs no environment to compile."""
        cfg, mt = self.cfg, self.mt
        b = min(rows, cfg.max_rows) if cfg.max_rows else rows
        n, k, q = mt.max_total_tokens, max(cfg.record_topk, 1), obs_bucket(obs_len, mt)
        r = self.round_width
        abstract = lambda tree: jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree,
            batch_layout(tree, batch_sharding))
        ints = lambda *shape, dt=jnp.int32: abstract(jax.ShapeDtypeStruct(shape, dt))
        tok = ints(b, width)
        prefill = self._prefill.lower(params, tok, tok, length=width + n + r)

        def initial(params, toks, valid):  # run's first LoopState (its shapes and dtypes)
            logits, cache = _prefill(params, toks, valid, model=self.model,
                                     length=width + n + r)
            return _initial_state(logits, cache, jax.random.key(0), valid, n, k)

        state = abstract(jax.eval_shape(initial, params, tok, tok))
        loop = self._loop_fn(eot).lower(params, state)
        append = self._append.lower(params, state, ints(b, q), ints(b, q), ints(b),
                                    ints(b, dt=jnp.bool_))
        cache = f"{width} + {n} + {r}"
        return [("prefill", f"{b} rows x {width} into a {cache} cache", prefill),
                ("loop", f"{b} rows x ({cache}) tokens, <= {mt.max_turns} turns", loop),
                ("append", f"{b} rows x {q} tokens onto the {cache} cache", append)]

    def run(self, params, envs: Sequence, seeds: Sequence[int], group_size: int, key):
        """``envs``: one TokenEnv per episode (E = len(seeds) x group_size; the group_size
        episodes of a seed adjacent, each with its own env instance); returns (Rollout,
        trajectory.Trajectories), one row per episode. Every env must share one end-of-turn id.
        With SamplerConfig.max_rows < E, max_rows rows play the episodes: a row whose episode
        ended takes the next one at the next host exit (its cache row reset, the new prompt
        appended)."""
        mt, cfg = self.mt, self.cfg
        check_int("group_size", group_size, 1)
        seeds = [int(s) for s in seeds for _ in range(group_size)]
        if len(envs) != len(seeds):
            raise ValueError(f"{len(envs)} environments for {len(seeds)} episodes "
                             f"({len(seeds) // group_size} seeds x group_size={group_size})")
        eots = {e.eot for e in envs}
        if len(eots) != 1:
            raise ValueError(f"the environments end turns with different token ids {eots}")
        eot = eots.pop()
        prompts = sampler_lib.as_prompt_list([e.reset(s) for e, s in zip(envs, seeds)],
                                             self.model.vocab_size, cfg.max_prompt_len)
        e_all, n, k = len(prompts), mt.max_total_tokens, max(cfg.record_topk, 1)
        b = min(e_all, cfg.max_rows) if cfg.max_rows else e_all
        width = sampler_lib.prompt_bucket(max(len(p) for p in prompts), cfg)
        toks, valid = sampler_lib.left_pad(prompts[:b], width)
        logits, cache = self._prefill(params, jnp.asarray(toks), jnp.asarray(valid),
                                      length=width + n + self.round_width)
        self.counts = Counts(prefill_tokens=int(valid.sum()))
        # the loop donates its state: the caller's key is not handed in (a derived one is)
        s = _initial_state(logits, cache, jax.random.fold_in(key, 0), valid, n, k)
        loop = self._loop_fn(eot)
        episode = list(range(b))  # the episode each row plays
        pending = b               # the next episode to start
        out = [np.zeros((e_all, n), np.int32), np.zeros((e_all, n), np.int32),
               np.zeros((e_all, n), np.float32), np.zeros((e_all, n, k), np.int32),
               np.zeros((e_all, n, k), np.float32)]
        length = np.zeros(e_all, np.int64)  # trajectory tokens of each finished episode
        rewards = [[] for _ in range(e_all)]
        starts = [[0] for _ in range(e_all)]  # trajectory column of each turn's 1st policy token
        finish = np.full(e_all, -1, np.int64)
        turn_ends = np.zeros(len(trajectory.TURN_ENDS), np.int64)
        steps = 0
        while True:
            s = loop(params, s)
            self.counts.exits += 1
            mode, t, turn_end, tokens, step = jax.device_get(
                (s.mode, s.t, s.turn_end, s.tokens, s.step))
            if step - steps > self.round_width:  # the round region would have wrapped
                raise RuntimeError(f"multi-turn loop call took {step - steps} steps, more than "
                                   f"its round region's {self.round_width} columns (a bug)")
            steps = int(step)
            waiting = np.flatnonzero(mode == WAIT)
            if waiting.size == 0:
                break
            mode, chunks, ended = mode.copy(), {}, []
            for i in waiting:
                e = episode[i]
                turn_ends[turn_end[i]] += 1
                step = envs[e].step(tokens[i, starts[e][-1]:t[i]].tolist(),
                                    ended=turn_end[i] == 0)
                rewards[e].append(step.reward)
                obs = step.obs_ids
                finish[e] = trajectory.episode_end(step, len(rewards[e]), int(t[i]), len(obs),
                                                   n, mt.max_turns)
                if finish[e] < 0:
                    chunks[i] = obs
                    starts[e].append(int(t[i]) + len(obs))  # the next policy turn's column
                if finish[e] >= 0:
                    ended.append(i)
                mode[i] = GEN if i in chunks else DONE
            reset = np.zeros(b, bool)
            if ended:  # keep the finished episodes' rows; their rows take pending episodes
                rows = jax.device_get(_outputs(s, cfg.record_topk))
                for i in ended:
                    for dst, src in zip(out, rows):
                        dst[episode[i]] = src[i]
                    length[episode[i]] = t[i]
                    if pending < e_all:
                        episode[i], pending = pending, pending + 1
                        chunks[i], reset[i], mode[i] = prompts[episode[i]].tolist(), True, GEN
            if not chunks:  # every waiting episode ended and none is pending
                s = self._merge(s._replace(mode=jnp.asarray(mode)))
                self.counts.merges += 1
                continue
            q = obs_bucket(max(len(v) for v in chunks.values()), mt)
            ids, ok = np.zeros((b, q), np.int32), np.zeros((b, q), np.int32)
            for i, c in chunks.items():
                ids[i, :len(c)], ok[i, :len(c)] = c, 1
            self.counts.prefill_tokens += int(ok[reset].sum())
            s = self._append(params, s, jnp.asarray(ids), jnp.asarray(ok), jnp.asarray(mode),
                             jnp.asarray(reset))
            self.counts.appends += 1
        # every episode ended with its reason (a row without one would be a bug: named)
        finish = np.where(finish < 0, trajectory.MAX_TOTAL_TOKENS, finish)
        self.counts.steps = int(s.step)
        tokens, mask, logp, topk_ids, topk_logp = out
        if not cfg.record_topk:
            topk_ids = topk_logp = None
        turn_index = np.full((e_all, n), -1, np.int32)  # turn k: its policy tokens + next obs
        for e in range(e_all):
            lo = 0
            for turn, hi in enumerate(starts[e][1:] + [int(length[e])]):
                turn_index[e, lo:hi] = turn
                lo = hi
        rollout = trajectory.build(prompts, width, tokens, mask, logp, topk_ids, topk_logp,
                                   finish, group_size)
        traj = trajectory.Trajectories.assemble(
            turn_index, rewards, mt.max_turns, finish, seeds, turn_ends,
            np.asarray([len(p) for p in prompts], np.int64) + length)
        return rollout, traj
