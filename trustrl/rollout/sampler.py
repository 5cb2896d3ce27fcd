"""Jitted batched sampler with a KV cache that records the behaviour policy mu.

The sampler only needs three pure functions of a policy (a ``DecodeModel``, the model layer's
contract in trustrl.model.policy): allocate a cache, prefill a left-padded prompt batch, decode
one token. ``trustrl.model.policy.decode_model`` binds them to the Flax model at a chosen rollout
precision (default bf16 while the trainer runs fp32: the
training-inference mismatch is real, as between vLLM and an FSDP trainer).

Shapes are bucketed (prompt length up to a power of two >= ``min_prompt_bucket``; batch and
max_new_tokens fixed by the config) so the number of compilations is bounded; one compiled
program runs prefill and a ``lax.while_loop`` decode that exits once every row hit EOS.

``record_routes`` (a mixture-of-experts policy, R3): the same program runs the DecodeModel's
``prefill_routes`` / ``decode_routes`` and writes the experts of every processed token into a
[B, P + N, M, k] buffer, returned as Rollout.routed_experts (layout in trustrl.rollout.record).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from trustrl.rollout import continuous
from trustrl.core import divergences
from trustrl.infra import multihost
from trustrl.rollout.record import FINISH_EOS, FINISH_LENGTH, Rollout, routes_dtype


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(
        x, (bool, np.bool_))


def check_int(name: str, value, low: int):
    # bool is an int subclass in Python: True would silently mean 1
    if not _is_int(value):
        raise TypeError(f"{name} must be an int >= {low}, got {value!r} "
                        f"({type(value).__name__})")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0            # 1.0 = off
    top_k: int = 0                # 0 = off (sampling truncation, not the recorded top-K)
    greedy: bool = False          # argmax; rollout_logp is then under softmax(logits / T)
    eos_ids: tuple = ()           # stop-token ids
    record_topk: int = 20         # K of rollout_topk_ids / rollout_topk_logp (0 = do not record)
    topk_method: str = "chunked"  # how the exact K-set is found (divergences.top_k; "lax")
    min_prompt_bucket: int = 16   # prompt lengths are padded up to powers of two from here
    max_prompt_len: int = 2048    # prompts longer than this are an error
    # rows decoded at once (0 = all): with more rows than this, the KV cache and the decode
    # buffers hold max_rows rows. continuous=True: max_rows slots, each refilled with the next
    # pending row when its row ends (trustrl.rollout.continuous; needs DecodeModel.insert);
    # False: the rows run as several calls of max_rows rows, each until its longest row ends.
    max_rows: int = 0
    continuous: bool = True
    refill_rows: int = 0          # rows prefilled per refill (0 = auto: max_rows / 8, <= 8)
    # R3: record Rollout.routed_experts, the experts a mixture-of-experts policy routed every
    # processed token to ([B, P + N, M, k] uint8 / uint16: B x (P + N) x M x k bytes per call);
    # needs a model with experts
    record_routes: bool = False
    # The mismatch dial's sampler-side sources (trustrl.rollout.mismatch, rollout.mismatch.*):
    # deliberate, labelled training-inference mismatch. ``logit_noise`` s: N(0, s^2) added to
    # every logit before the temperature, so the token is drawn from the noised distribution
    # and mu (rollout_logp, the recorded top-K) is that distribution. The two engine traps
    # leave sampling as it is and corrupt only what is recorded: ``record_pre_temperature``
    # records log softmax(logits) (the temperature ignored, vLLM's raw log-probs);
    # ``record_renormalized`` records the log-probs renormalised over the top-p / top-k set
    # the token was drawn from (the truncated distribution, not the trainer's full softmax).
    logit_noise: float = 0.0
    record_pre_temperature: bool = False
    record_renormalized: bool = False

    def __post_init__(self):
        """Checks every field that does not depend on the vocabulary (``validate`` does the
        rest); ``eos_ids`` may be given as one int or any sequence and is stored as a tuple."""
        for name, low in (("max_new_tokens", 1), ("top_k", 0), ("record_topk", 0),
                          ("min_prompt_bucket", 1), ("max_prompt_len", 1), ("max_rows", 0),
                          ("refill_rows", 0)):
            check_int(name, getattr(self, name), low)
        for name in ("greedy", "continuous", "record_routes", "record_pre_temperature",
                     "record_renormalized"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name, valid in (("temperature", "> 0"), ("top_p", "in (0, 1]")):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number {valid}, got {value!r}")
        if not self.temperature > 0:
            why = ("when sampling (greedy=False)" if not self.greedy
                   else "(it defines rollout_logp)")
            hint = "; use greedy=True for argmax decoding" if not self.greedy else ""
            raise ValueError(f"temperature must be > 0 {why}, got {self.temperature}{hint}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if (not _is_real(self.logit_noise) or not math.isfinite(self.logit_noise)
                or self.logit_noise < 0):
            raise ValueError(f"logit_noise must be a finite number >= 0 (the std of the noise "
                             f"added to the rollout's logits), got {self.logit_noise!r}")
        if self.record_renormalized and not self.truncated:
            raise ValueError("record_renormalized needs a truncated sampling distribution "
                             "(top_p < 1 or top_k > 0, not greedy): without one it records "
                             "the full softmax")
        if self.record_renormalized and self.record_topk:
            raise ValueError(f"record_renormalized with record_topk={self.record_topk}: the "
                             f"renormalised distribution is -inf outside the top-p / top-k set, "
                             f"so its top-K cannot be recorded; valid: record_topk=0")
        eos = self.eos_ids
        eos = (eos,) if _is_int(eos) else eos
        if isinstance(eos, (str, bytes)) or not isinstance(eos, (Sequence, np.ndarray)):
            raise TypeError(f"eos_ids must be an int or a sequence of ints, got {eos!r}")
        for e in eos:
            check_int("eos_ids", e, 0)
        object.__setattr__(self, "eos_ids", tuple(int(e) for e in eos))  # frozen dataclass
        if self.topk_method not in divergences.TOPK_ALGORITHMS:
            raise ValueError(f"topk_method must be one of {divergences.TOPK_ALGORITHMS}, got "
                             f"{self.topk_method!r}")

    def validate(self, vocab_size: int):
        """The checks that need the model's vocabulary size."""
        if not self.top_k <= vocab_size:
            raise ValueError(f"top_k must be in [0, vocab_size={vocab_size}], got {self.top_k}")
        if not self.record_topk <= vocab_size:
            raise ValueError(f"record_topk K={self.record_topk} is larger than the vocabulary "
                             f"({vocab_size}); valid: 0 <= K <= {vocab_size}")
        bad = [e for e in self.eos_ids if e >= vocab_size]
        if bad:
            raise ValueError(f"eos_ids {bad} are outside the vocabulary: valid ids are "
                             f"[0, {vocab_size}) (vocab_size={vocab_size})")

    @property
    def truncated(self) -> bool:
        return not self.greedy and (self.top_p < 1.0 or self.top_k > 0)


def as_prompt_list(prompts, vocab_size: int, max_prompt_len: int) -> list[np.ndarray]:
    """Checks prompts and returns them as 1-D int arrays. ``prompts``: a sequence of token-id
    sequences (lists, tuples, 1-D integer arrays) or a 2-D integer array of equal-length
    prompts (one per row). Token ids must be integers in [0, vocab_size)."""
    if isinstance(prompts, (np.ndarray, jax.Array)):
        if prompts.ndim != 2:
            raise ValueError(f"a prompt array must be 2-D [num_prompts, length], got shape "
                             f"{prompts.shape}; pass a list of prompts for unequal lengths")
        prompts = list(np.asarray(prompts))
    elif isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a sequence of token-id sequences (or a 2-D int "
                        f"array), got {type(prompts).__name__}; tokenize text first")
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    out = []
    for i, pr in enumerate(prompts):
        if isinstance(pr, (str, bytes)):
            raise TypeError(f"prompt {i} is a {type(pr).__name__}, not token ids; tokenize it")
        try:
            arr = np.asarray(pr)
        except ValueError as e:  # ragged nesting
            raise ValueError(f"prompt {i} is not a flat sequence of token ids: {e}") from e
        if arr.ndim != 1:
            raise ValueError(f"prompt {i} must be a flat sequence of token ids, got shape "
                             f"{arr.shape}")
        if arr.size == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        # Floats are refused even when integral: they point to an upstream bug, and float32
        # cannot represent every id of a large vocabulary (above 2**24).
        if arr.dtype.kind not in "iu":
            raise TypeError(f"prompt {i} has token ids of dtype {arr.dtype}; token ids must be "
                            "integers (floats are not rounded)")
        if arr.size > max_prompt_len:
            raise ValueError(f"prompt {i} has {arr.size} tokens, longer than max_prompt_len="
                             f"{max_prompt_len} (the KV cache size is max_prompt_len "
                             "bucket + max_new_tokens)")
        if arr.min() < 0 or arr.max() >= vocab_size:
            bad = arr[(arr < 0) | (arr >= vocab_size)]
            raise ValueError(f"prompt {i} has token ids {bad[:5].tolist()} outside [0, "
                             f"{vocab_size}) (vocab_size={vocab_size})")
        out.append(arr.astype(np.int32))
    return out


_warned_truncation = False


def _warn_truncation_once(cfg: SamplerConfig):
    global _warned_truncation
    if cfg.truncated and not cfg.record_renormalized and not _warned_truncation:
        _warned_truncation = True
        warnings.warn(
            f"top_p={cfg.top_p} / top_k={cfg.top_k} truncate the sampling distribution, but "
            "rollout_logp and the recorded top-K are log-probs under the UNtruncated tempered "
            "softmax (what the trainer recomputes). The trust-region anchor mu then differs "
            "from the distribution tokens were drawn from.", stacklevel=3)


def prompt_bucket(length: int, cfg: SamplerConfig) -> int:
    return max(cfg.min_prompt_bucket, 1 << max(0, math.ceil(math.log2(max(length, 1)))))


def left_pad(prompts: Sequence[Sequence[int]], width: int):
    """Left-pads token lists to ``width`` with id 0: (tokens [n, width], mask [n, width])."""
    toks = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        if len(p):
            toks[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
    return toks, mask


def filter_logits(logits, top_p: float, top_k: int):
    """Sets logits outside the top-k / nucleus (top-p) set to -inf. [B, V] -> [B, V]."""
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep a token if the mass strictly before it is < top_p (the first is always kept)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return logits


class _LoopState(NamedTuple):
    step: jax.Array
    logits: jax.Array
    positions: jax.Array
    cache: Any
    done: jax.Array
    key: jax.Array
    tokens: jax.Array
    logp: jax.Array
    topk_ids: jax.Array
    topk_logp: jax.Array
    mask: jax.Array
    routes: Any = None  # [B, P + N, M, k] (record_routes) or None


def _route_spec(model, cfg: SamplerConfig):
    """(M, k, dtype) of the routed-experts buffer when ``cfg.record_routes``, else None."""
    if not cfg.record_routes:
        return None
    return model.moe_layers, model.experts_per_tok, routes_dtype(model.num_experts)


def prompt_routes(ids, prompt_mask, n: int, dtype):
    """The routed-experts buffer [B, P + N, M, k] of a prefill: the prompt columns' ids [B, P,
    M, k] where the prompt is real (left padding 0), the N response columns 0."""
    b, p, m, k = ids.shape
    ids = jnp.where(prompt_mask[:, :, None, None] > 0, ids, 0).astype(dtype)
    return jnp.concatenate([ids, jnp.zeros((b, n, m, k), dtype)], axis=1)


def next_token(logits, key, cfg: SamplerConfig):
    """One decode step's choice: (tokens [B], their log mu [B], log mu [B, V]), mu the tempered
    softmax over the full vocabulary (the recorded distribution: with the dial's
    ``logit_noise`` the noised one, with a trap the corrupted one; SamplerConfig)."""
    logits = logits.astype(jnp.float32)
    if cfg.logit_noise > 0:  # a key of its own: the sampling draw below keeps ``key``
        key, k_noise = jax.random.split(key)
        logits = logits + cfg.logit_noise * jax.random.normal(k_noise, logits.shape, jnp.float32)
    logp_full = jax.nn.log_softmax(logits / cfg.temperature, axis=-1)
    filtered = None
    if cfg.greedy:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        filtered = filter_logits(logp_full, cfg.top_p, cfg.top_k)
        tok = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    recorded = logp_full
    if cfg.record_pre_temperature:
        recorded = jax.nn.log_softmax(logits, axis=-1)
    if cfg.record_renormalized:  # over the set the token was drawn from (filtered's support)
        recorded = jax.nn.log_softmax(jnp.where(filtered > -jnp.inf, recorded, -jnp.inf), -1)
    return tok, jnp.take_along_axis(recorded, tok[:, None], axis=-1)[:, 0], recorded


def record_topk(logp_full, cfg: SamplerConfig):
    """mu's plain top-K of one step: (ids [B, K] int32, log mu [B, K]); ``_k_sets`` forces the
    sampled tokens in after the loop (divergences.force_sampled)."""
    vals, ids = divergences.top_k(logp_full, cfg.record_topk, cfg.topk_method)
    return ids, vals


def _k_sets(out):
    """The recorded top-K of a whole call made K-sets (divergences.build_topk_set's rule).
    Padding positions (id 0, log-prob 0, token 0) stay as they are."""
    tokens, mask, logp, topk_ids, topk_logp, finish, routes = out
    topk_ids, topk_logp = divergences.force_sampled(topk_ids, topk_logp, tokens, logp)
    return tokens, mask, logp, topk_ids, topk_logp, finish, routes


def _generate_continuous(params, prompt_tokens, prompt_mask, num_rows, cache, key, *,
                         model, cfg: SamplerConfig):
    out, cache = continuous.generate(
        params, prompt_tokens, prompt_mask, num_rows, cache, key, model=model,
        max_new_tokens=cfg.max_new_tokens, eos_ids=cfg.eos_ids, refill=cfg.refill_rows,
        next_token=functools.partial(next_token, cfg=cfg),
        record_topk=functools.partial(record_topk, cfg=cfg) if cfg.record_topk else None,
        topk=cfg.record_topk, routes=_route_spec(model, cfg))
    return (_k_sets(out) if cfg.record_topk else out), cache


def _generate(params, prompt_tokens, prompt_mask, cache, key, *, model,
              cfg: SamplerConfig):
    b, p = prompt_tokens.shape
    n, k = cfg.max_new_tokens, max(cfg.record_topk, 1)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    spec = _route_spec(model, cfg)
    routes = None
    if spec is None:
        logits, cache = model.prefill(params, prompt_tokens, positions, prompt_mask, cache)
    else:
        logits, cache, ids = model.prefill_routes(params, prompt_tokens, positions, prompt_mask,
                                                  cache)
        routes = prompt_routes(ids, prompt_mask, n, spec[2])
    next_pos = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)
    eos = jnp.asarray(cfg.eos_ids or (-1,), jnp.int32)

    def body(s: _LoopState):
        key, sub = jax.random.split(s.key)
        tok, tok_logp, logp_full = next_token(s.logits, sub, cfg)
        live = ~s.done
        livef = live.astype(jnp.float32)
        tok = jnp.where(live, tok, 0)
        upd = lambda buf, val: jax.lax.dynamic_update_index_in_dim(buf, val, s.step, axis=1)
        state = s._replace(
            tokens=upd(s.tokens, tok), logp=upd(s.logp, tok_logp * livef),
            mask=upd(s.mask, live.astype(jnp.int32)))
        if cfg.record_topk:
            ids, lp = record_topk(logp_full, cfg)
            state = state._replace(topk_ids=upd(s.topk_ids, jnp.where(live[:, None], ids, 0)),
                                   topk_logp=upd(s.topk_logp, lp * livef[:, None]))
        done = s.done | jnp.any(tok[:, None] == eos[None, :], axis=-1)
        if spec is None:
            logits, cache = model.decode(params, tok, s.positions, s.cache)
        else:  # the ids of the token this step consumes: response column `step` (not the last)
            logits, cache, ids = model.decode_routes(params, tok, s.positions, s.cache)
            keep = (live & (s.step < n - 1))[:, None, None]
            col = jnp.where(keep, ids, 0).astype(spec[2])[:, None]
            state = state._replace(routes=jax.lax.dynamic_update_slice_in_dim(
                s.routes, col, p + s.step, axis=1))
        return state._replace(step=s.step + 1, logits=logits, positions=s.positions + 1,
                              cache=cache, done=done, key=key)

    def cond(s: _LoopState):
        return (s.step < n) & ~jnp.all(s.done)

    init = _LoopState(
        step=jnp.int32(0), logits=logits, positions=next_pos, cache=cache,
        done=jnp.zeros((b,), bool), key=key, tokens=jnp.zeros((b, n), jnp.int32),
        logp=jnp.zeros((b, n), jnp.float32), topk_ids=jnp.zeros((b, n, k), jnp.int32),
        topk_logp=jnp.zeros((b, n, k), jnp.float32), mask=jnp.zeros((b, n), jnp.int32),
        routes=routes)
    s = jax.lax.while_loop(cond, body, init)
    finish = jnp.where(s.done, FINISH_EOS, FINISH_LENGTH).astype(jnp.int32)
    out = (s.tokens, s.mask, s.logp, s.topk_ids, s.topk_logp, finish, s.routes)
    return (_k_sets(out) if cfg.record_topk else out), s.cache


class Sampler:
    """Batched generation of groups of responses; returns a Rollout record.

    >>> sampler = Sampler(decode_model, SamplerConfig(max_new_tokens=32, eos_ids=(2,)))
    >>> rollout = sampler.generate(params, [[5, 6, 7], [8]], group_size=4, key=key)
    """

    def __init__(self, model, cfg: SamplerConfig, *, batch_sharding=None):  # a DecodeModel
        cfg.validate(model.vocab_size)
        if cfg.record_routes and getattr(model, "prefill_routes", None) is None:
            raise ValueError("record_routes=True records the experts a mixture-of-experts "
                             "policy routes each token to, but this model has no experts (a "
                             "dense model, num_experts=0, or a DecodeModel without "
                             "prefill_routes / decode_routes); set record_routes=False")
        self.model, self.cfg = model, cfg
        self.batch_sharding = batch_sharding
        # The KV cache is allocated once per (batch, length) bucket and donated to every call,
        # which hands it back: XLA updates it in place, no per-iteration reallocation. Stale
        # entries from the previous call are never attended (the model masks unwritten slots).
        # Only the last shape's cache is kept (``_cache``); ``release`` frees it.
        gen = functools.partial(_generate, model=model, cfg=cfg)
        cont_model = model
        if batch_sharding is not None and model.insert is not None:
            cont_model = model._replace(insert=self._local_insert(model.insert))
        cont = functools.partial(_generate_continuous, model=cont_model, cfg=cfg)
        if batch_sharding is not None:  # outputs and the returned cache keep the batch layout
            gen = lambda *a, _g=gen: self._constrain_out(*_g(*a))  # so the donated cache fits
            cont = lambda *a, _g=cont: self._constrain_out(*_g(*a))  # again
        self._run = jax.jit(gen, donate_argnums=(3,))
        self._run_continuous = jax.jit(cont, donate_argnums=(4,))
        self._caches = {}

    def _local_insert(self, insert):
        """``insert`` (transformer.insert_rows) inside a shard_map over the cache's layout: each
        device writes the refilled rows whose slot is one of its own, into its own shard. A
        dynamic row index on the batch-sharded cache made the SPMD partitioner build the update
        as a full-size temporary: a copy of the whole cache (measured: Qwen3-0.6B on v5p 2x4x4,
        512 slots x 1,024 columns, +1.65 GiB of temporaries, the cache's size)."""
        mesh = self.batch_sharding.mesh
        batch_axes = self.batch_sharding.spec[0]

        def spec_without_batch(sh, x):
            return P(*((None,) + tuple(sh.spec)[1:x.ndim])) if x.ndim else P()

        def local(cache, new, slots):
            b = cache.valid.shape[0]
            offset = jax.lax.axis_index(batch_axes) * b if batch_axes else 0
            mine = slots - offset
            return insert(cache, new, jnp.where((mine >= 0) & (mine < b), mine, b))

        def fn(cache, new, slots):
            cache_specs = jax.tree.map(lambda sh: sh.spec, self.layout(cache))
            new_specs = jax.tree.map(spec_without_batch, self.layout(new), new)
            return jax.shard_map(local, mesh=mesh, in_specs=(cache_specs, new_specs, P()),
                                 out_specs=cache_specs, check_vma=False)(cache, new, slots)
        return fn

    def _constrain_out(self, out, cache):
        """(out, cache) of a call constrained: the cache by ``_constrain``, the outputs over
        their batch axis only (the routed experts [B, T, M, k] are not a KV cache)."""
        return jax.tree.map(jax.lax.with_sharding_constraint, out,
                            self.layout(out, kv=False)), self._constrain(cache)

    def _constrain(self, tree):
        """Every leaf sharded over its leading (batch) axis like the prompts, scalars replicated,
        and the KV cache's [batch, kv_heads, length, head_dim] keys / values also over the
        "tensor" mesh axis by kv head (as the k / v projections shard them) when it divides
        them: the layout the cache is created with, so a donated cache comes back as it went in
        (each shape compiles once), and a tensor-parallel mesh splits the cache 4-D leaves."""
        return jax.tree.map(jax.lax.with_sharding_constraint, tree, self.layout(tree))

    def layout(self, tree, kv: bool = True):
        """The NamedShardings ``_constrain`` gives the leaves of ``tree`` (arrays or shapes);
        ``kv=False``: every leaf over its batch axis only."""
        mesh, spec = self.batch_sharding.mesh, self.batch_sharding.spec
        tensor = mesh.shape.get("tensor", 1) if kv else 1

        def spec_of(x):
            if not x.ndim:
                return P()
            if x.ndim == 4 and tensor > 1 and x.shape[1] % tensor == 0:
                return P(spec[0], "tensor", None, None)
            return P(spec[0], *[None] * (x.ndim - 1))

        return jax.tree.map(lambda x: NamedSharding(mesh, spec_of(x)), tree)

    def abstract_cache(self, rows: int, width: int):
        """The KV cache ``generate`` keeps for ``rows`` decode rows at prompt bucket ``width``,
        as jax.ShapeDtypeStructs with the layout it is created with (nothing allocated)."""
        cache = jax.eval_shape(lambda: self.model.init_cache(rows, width + self.cfg.max_new_tokens))
        if self.batch_sharding is None:
            return cache
        return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                            cache, self.layout(cache))

    def lower(self, params, rows: int, width: int):
        """The program ``generate`` runs for ``rows`` rows (prompts x group size) at prompt
        bucket ``width``, lowered on abstract arguments (``params`` may be ShapeDtypeStructs):
        (a description, the jax Lowered, the abstract cache it is given). For
        trustrl.tools.aot_check; needs a batch sharding (a mesh)."""
        m, n = self.cfg.max_rows, self.cfg.max_new_tokens
        spec = lambda shape, sh: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh)
        mesh = self.batch_sharding.mesh
        replicated = NamedSharding(mesh, P())
        key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                                   sharding=replicated)
        slots = min(rows, m) if m else rows
        cache = self.abstract_cache(slots, width)
        if slots < rows and self.cfg.continuous and self.model.insert is not None:
            tok = spec((-(-rows // slots) * slots, width), self.batch_sharding)
            return (f"{rows} rows through {slots} continuous slots x ({width} + {n}) tokens",
                    self._run_continuous.lower(params, tok, tok, spec((), replicated), cache,
                                               key), cache)
        tok = spec((slots, width), self.batch_sharding)
        what = f"{slots} rows x ({width} + {n}) tokens" + (
            f", {-(-rows // slots)} calls" if slots < rows else "")
        return what, self._run.lower(params, tok, tok, cache, key), cache

    def num_compilations(self) -> int:
        """Distinct compiled shapes so far (the bucketing keeps this small)."""
        return self._run._cache_size() + self._run_continuous._cache_size()

    def generate(self, params, prompts: Sequence[Sequence[int]], group_size: int, key) -> Rollout:
        """``prompts``: token-id lists or a 2-D int array (see ``as_prompt_list``)."""
        cfg = self.cfg
        prompts = as_prompt_list(prompts, self.model.vocab_size, cfg.max_prompt_len)
        check_int("group_size", group_size, 1)
        _warn_truncation_once(cfg)
        width = prompt_bucket(max(len(p) for p in prompts), cfg)
        expanded = [p for p in prompts for _ in range(group_size)]
        if cfg.max_rows and len(expanded) > cfg.max_rows:
            if cfg.continuous and self.model.insert is not None:
                return self._generate_continuous(params, expanded, width, key, len(prompts),
                                                 group_size)
            return self._generate_in_parts(params, expanded, width, key, len(prompts), group_size)
        return self._generate_rows(params, expanded, width, key, len(prompts), group_size)

    def release(self):
        """Frees the kept KV cache (the next call allocates a new one): e.g. the evaluation
        sampler's between evaluations, so it holds no device memory during training."""
        self._caches.clear()

    def _cache(self, rows: int, width: int):
        """The donated KV cache of this (rows, length) bucket, created on first use. One cache
        is kept at a time: a call of another shape frees the previous one, so a second prompt
        bucket replaces the first's cache instead of holding both."""
        cache_key = (rows, width + self.cfg.max_new_tokens)
        cache = self._caches.pop(cache_key, None)
        self._caches.clear()
        if cache is None:
            init = functools.partial(self.model.init_cache, *cache_key)
            if self.batch_sharding is not None:  # created in place, sharded (multi-process too)
                cache = jax.jit(lambda: self._constrain(init()))()
            else:
                cache = init()
        return cache_key, cache

    def _place(self, toks, mask):
        if self.batch_sharding is not None:  # each process places its rows (multihost.to_global)
            return multihost.to_global((toks, mask), self.batch_sharding)
        return jnp.asarray(toks), jnp.asarray(mask)

    def _generate_continuous(self, params, expanded, width, key, n_prompts, group_size):
        """max_rows slots over all rows (trustrl.rollout.continuous). The prompt rows are padded to
        a
        multiple of max_rows (one compiled shape per bucket, whole shards per device); padding
        rows are never decoded."""
        m, n = self.cfg.max_rows, len(expanded)
        rows = -(-n // m) * m
        toks, mask = self._place(*left_pad(expanded + [expanded[-1]] * (rows - n), width))
        cache_key, cache = self._cache(m, width)
        out, self._caches[cache_key] = self._run_continuous(params, toks, mask, jnp.int32(n),
                                                            cache, key)
        return self._rollout(jax.tree.map(lambda x: x[:n], (toks, mask, *out)), n_prompts,
                             group_size)

    def _generate_in_parts(self, params, expanded, width, key, n_prompts, group_size):
        """max_rows rows per call (the last call padded with repeats of its last row: one
        compiled shape), the parts' rows concatenated; part i uses fold_in(key, i)."""
        m, parts = self.cfg.max_rows, []
        for i, start in enumerate(range(0, len(expanded), m)):
            rows = expanded[start:start + m]
            n = len(rows)
            r = self._generate_rows(params, rows + [rows[-1]] * (m - n), width,
                                    jax.random.fold_in(key, i), 1, m)
            parts.append(jax.tree.map(lambda x, n=n: x[:n], r))
        out = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
        return out.replace(group_index=jnp.repeat(jnp.arange(n_prompts, dtype=jnp.int32),
                                                  group_size))

    def _generate_rows(self, params, expanded, width, key, n_prompts, group_size) -> Rollout:
        toks, mask = self._place(*left_pad(expanded, width))
        cache_key, cache = self._cache(len(expanded), width)
        out, self._caches[cache_key] = self._run(params, toks, mask, cache, key)
        return self._rollout((toks, mask, *out), n_prompts, group_size)

    def _rollout(self, arrays, n_prompts, group_size) -> Rollout:
        toks, mask, tokens, rmask, logp, topk_ids, topk_logp, finish, routes = arrays
        if not self.cfg.record_topk:
            topk_ids = topk_logp = None
        return Rollout(
            prompt_tokens=toks, prompt_mask=mask, response_tokens=tokens, response_mask=rmask,
            rollout_logp=logp, rollout_topk_ids=topk_ids, rollout_topk_logp=topk_logp,
            finish_reason=finish,
            group_index=jnp.repeat(jnp.arange(n_prompts, dtype=jnp.int32), group_size),
            routed_experts=routes)
