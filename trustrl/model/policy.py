"""Glue between the model, the sampler and the trainer: one policy, two precisions.

The trainer runs ``model_cfg`` (default fp32). The rollout engine runs the SAME parameters cast to
the rollout precision (default bf16 weights, activations and KV cache) through the KV-cache
decode path, so the training-inference mismatch is real, as with vLLM vs FSDP:

    roll_cfg = policy.rollout_config(model_cfg, "bfloat16")
    sampler = Sampler(policy.decode_model(roll_cfg), SamplerConfig(...))
    rollout = sampler.generate(policy.cast_params(params, roll_cfg), prompts, group_size, key)
    logits = policy.response_logits(params, model_cfg, rollout.tokens, rollout.positions,
                                    rollout.valid_mask, num_response=N)   # trainer side
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from trustrl.model import transformer as model_lib
from trustrl.model import quant
from trustrl.model import vocab_head


class DecodeModel(NamedTuple):
    """A policy as seen by the sampler (all pure, closed over the model config).

    init_cache(batch, max_len) -> cache pytree
    prefill(params, tokens [B, P], positions [B, P], valid [B, P], cache)
        -> (logits of the last column [B, V] float32, cache)
    decode(params, tokens [B], positions [B], cache[, valid [B] bool])
        -> (logits [B, V] float32, cache); ``valid`` False: the row's column is padding

    A mixture-of-experts policy also records its routing (R3; ``decode_model`` fills these for
    a config with experts, None / 0 otherwise): ``prefill_routes`` / ``decode_routes`` take the
    arguments of prefill / decode and return (logits, cache, ids) with ids the experts each new
    column went to in each of the ``moe_layers`` sparse layers (ModelConfig.sparse_layers
    order): [B, P, M, k] int32 (prefill), [B, M, k] int32 (decode); the same computation as
    prefill / decode, the routing read from the sown intermediates.
    """
    init_cache: Callable[..., Any]
    prefill: Callable[..., Any]
    decode: Callable[..., Any]
    vocab_size: int
    # insert(cache, new_cache, slots [R]) -> cache: a prefilled R-row cache into those rows at
    # the write column (transformer.insert_rows); continuous batching needs it (None: not supported)
    insert: Callable[..., Any] | None = None
    # extend(params, tokens [B, T], positions [B, T], valid [B, T], cache) -> (logits of each
    # row's last valid column [B, V], cache): tokens appended to a running (row-indexed) cache,
    # the multi-turn sampler's observations (transformer.extend; None: not supported)
    extend: Callable[..., Any] | None = None
    prefill_routes: Callable[..., Any] | None = None
    decode_routes: Callable[..., Any] | None = None
    num_experts: int = 0      # X (0: a dense model)
    moe_layers: int = 0       # M, the sparse layers
    experts_per_tok: int = 0  # k


def response_logits_slice(logits_bl, prompt_len: int, num_response: int):
    """Logits that predict the response tokens: positions P-1 .. P+N-2 of a [B, P+N, ...] array."""
    return logits_bl[:, prompt_len - 1: prompt_len - 1 + num_response]


ROLLOUT_DTYPES = model_lib.DTYPES + quant.QUANT
HEAD_DTYPES = ("",) + model_lib.DTYPES  # "": the trunk's dtype
HEADS = ("fused", "plain")


def rollout_config(model_cfg: model_lib.ModelConfig, dtype: str,
                   head_dtype: str = "") -> model_lib.ModelConfig:
    """The rollout engine's view of the model: parameters and activations in ``dtype``;
    ``head_dtype="float32"``: the vocabulary head's weights and matmul in float32 (the trunk
    stays in ``dtype``). ``dtype`` "int8" / "fp8": the trunk's matmul kernels stored in 8 bits
    with per-channel scales (trustrl.model.quant), everything else and the activations in bf16."""
    if dtype not in ROLLOUT_DTYPES:
        raise ValueError(f"rollout dtype must be one of {ROLLOUT_DTYPES}, got {dtype!r}")
    if head_dtype not in HEAD_DTYPES:
        raise ValueError(f"rollout head dtype must be '', 'float32' or 'bfloat16', got "
                         f"{head_dtype!r}")
    weight_quant = dtype if dtype in quant.QUANT else ""
    dtype = "bfloat16" if weight_quant else dtype
    return dataclasses.replace(model_cfg, param_dtype=dtype, dtype=dtype, remat=False,
                               head_dtype=head_dtype, weight_quant=weight_quant)


def cast_params(params, model_cfg: model_lib.ModelConfig):
    """Parameters cast to ``model_cfg``'s storage dtypes: ``param_dtype``, and ``head_dtype``
    for the vocabulary head (a no-op where they already are); under ``weight_quant`` the
    matmul kernels are quantised from the given (e.g. float32 master) values."""
    if model_cfg.weight_quant and not any(quant.is_quantized(x) for x in jax.tree.leaves(params)):
        params = quant.quantize_params(params, model_cfg.weight_quant, model_cfg.scan_layers)
    dtype, head = jnp.dtype(model_cfg.param_dtype), model_cfg.head_dtype
    head_names = {"embedding" if model_cfg.tie_word_embeddings else "lm_head"} if head else set()

    def cast(path, x):
        if quant.is_quantized(x) or getattr(path[-1], "key", "").endswith(quant.SCALE_SUFFIX):
            return x
        want = jnp.dtype(head) if any(getattr(k, "key", None) in head_names for k in path) \
            else dtype
        return x if x.dtype == want else x.astype(want)

    return jax.tree_util.tree_map_with_path(cast, params)


def decode_model(model_cfg: model_lib.ModelConfig) -> DecodeModel:
    """The sampler's view of the model: prefill / decode closed over the (static) config; for a
    mixture of experts also their routing-recording variants (``prefill_routed``)."""
    model = DecodeModel(
        init_cache=lambda batch, max_len: model_lib.init_cache(model_cfg, batch, max_len),
        prefill=lambda p, *a: model_lib.prefill(p, model_cfg, *a),
        decode=lambda p, *a: model_lib.decode_step(p, model_cfg, *a),
        vocab_size=model_cfg.vocab_size, insert=model_lib.insert_rows,
        extend=lambda p, *a: model_lib.extend(p, model_cfg, *a))
    if not model_cfg.sparse_layers:
        return model
    return model._replace(
        prefill_routes=lambda p, *a: prefill_routed(p, model_cfg, *a),
        decode_routes=lambda p, *a: decode_step_routed(p, model_cfg, *a),
        num_experts=model_cfg.num_experts, moe_layers=len(model_cfg.sparse_layers),
        experts_per_tok=model_cfg.num_experts_per_tok)


def _extend_routed(params, model_cfg: model_lib.ModelConfig, tokens, positions, valid, cache,
                   fresh: bool = False):
    """transformer._extend's computation (unrolled layers against the KV cache) that also
    returns the sown routing: (hidden [B, T, E], cache, ids [B, T, M, k] int32)."""
    params = model_lib.unstack_layers(params, model_cfg)
    cfg = model_lib.unrolled_config(model_cfg)
    (hidden, cache), state = model_lib.Transformer(cfg).apply(
        {"params": params}, tokens, positions, valid, cache, fresh, mutable=["intermediates"])
    ids = model_lib.moe_intermediates(state["intermediates"], cfg)["ids"]
    return hidden, cache, ids.astype(jnp.int32)


def prefill_routed(params, model_cfg: model_lib.ModelConfig, tokens, positions, valid, cache):
    """``transformer.prefill`` that also returns the routing of every column: (logits of the
    last column [B, V] float32, cache, ids [B, T, M, k] int32: the experts each token went to
    in each of the M sparse layers; left-padding columns hold whatever the router chose for
    them, unused)."""
    hidden, cache, ids = _extend_routed(params, model_cfg, tokens, positions, valid,
                                        model_lib.reset_cache(cache), fresh=True)
    return model_lib.lm_head(params, model_cfg, hidden[:, -1]), cache, ids


def decode_step_routed(params, model_cfg: model_lib.ModelConfig, tokens, positions, cache):
    """``transformer.decode_step`` that also returns the routing of the consumed tokens:
    (logits [B, V] float32, cache, ids [B, M, k] int32)."""
    tokens, positions = tokens[:, None], positions[:, None]
    hidden, cache, ids = _extend_routed(params, model_cfg, tokens, positions,
                                        jnp.ones_like(tokens, bool), cache)
    return model_lib.lm_head(params, model_cfg, hidden[:, 0]), cache, ids[:, 0]


def response_hidden(params, model_cfg: model_lib.ModelConfig, tokens, positions, valid, *,
                    num_response: int, routes=None, with_routing: bool = False):
    """Final-normed hidden states [B, N, E] that predict the N response tokens of [B, P + N]
    sequences (positions P-1 .. P+N-2); the input of the (fused) vocabulary head.

    A mixture of experts: ``routes`` [B, P + N, M, k] replays these experts in its M sparse
    layers (R3; None: the model routes); ``with_routing``: returns (hidden, the trunk's moe
    dict: ids [B, P + N, M, k], per-layer "counts", "prob_sums" [M, X] and "tokens" [M] over
    the valid tokens; ``transformer.forward_moe``)."""
    prompt_len = tokens.shape[1] - num_response
    if prompt_len < 1:
        raise ValueError(f"sequences of length {tokens.shape[1]} have no prompt before "
                         f"num_response={num_response} response tokens")
    if with_routing:
        hidden, moe = model_lib.forward_moe(params, model_cfg, tokens, positions, valid,
                                            routes=routes)
        return response_logits_slice(hidden, prompt_len, num_response), moe
    hidden = model_lib.forward(params, model_cfg, tokens, positions, valid, routes=routes)
    return response_logits_slice(hidden, prompt_len, num_response)


def response_logits(params, model_cfg: model_lib.ModelConfig, tokens, positions, valid, *,
                    num_response: int, temperature: float = 1.0, routes=None):
    """Tempered logits [B, N, V] float32 predicting the N response tokens of [B, P + N] sequences.

    The plain head (the reference for trustrl.model.vocab_head, and what notebooks inspect): the
    vocabulary head runs only on the N hidden states that predict response tokens, not on the
    prompt. Logits are divided by the sampling ``temperature``, so log_softmax of them is the
    distribution rollout_logp was recorded under. ``routes``: as ``response_hidden``'s.
    """
    hidden = response_hidden(params, model_cfg, tokens, positions, valid,
                             num_response=num_response, routes=routes)
    logits = model_lib.lm_head(params, model_cfg, hidden)
    return logits if temperature == 1.0 else logits / temperature


def response_head(params, model_cfg: model_lib.ModelConfig, batch, *, temperature: float = 1.0,
                  mu_params=None, mu_model_cfg=None, topk_ids=None, mesh=None,
                  logp_grad=None, head: str = "fused", on_correction=None, routes=None,
                  with_routing: bool = False):
    """The fused vocabulary head (trustrl.model.vocab_head) on the response positions of ``batch``
    (tokens / positions / valid / response_tokens): logp (differentiable), entropy, and with
    ``topk_ids`` log pi at those ids, with ``mu_params`` (frozen, at ``mu_model_cfg``'s
    precision) the exact TV / KL(mu || pi). No [tokens, vocab] array is kept. ``logp_grad``:
    the loss-fused head (see vocab_head.fused_head, also for ``on_correction``). ``head="plain"``:
    the same outputs from
    [tokens, vocab] logits (vocab_head.plain_head, the reference; benchmarks measure it).
    A mixture of experts: ``routes`` (R3) replays experts in the policy's trunk and in mu's;
    ``with_routing`` returns (outputs, the policy trunk's moe dict) (``response_hidden``)."""
    if head not in HEADS:
        raise ValueError(f"head={head!r} is not valid; choose one of {HEADS}")
    n = batch["response_tokens"].shape[1]
    args = (batch["tokens"], batch["positions"], batch["valid"])
    hidden = response_hidden(params, model_cfg, *args, num_response=n, routes=routes,
                             with_routing=with_routing)
    hidden, moe = hidden if with_routing else (hidden, None)
    w, axis = vocab_head.head_weight(params, model_cfg)
    mu_hidden = mu_w = None
    if mu_params is not None:
        mu_cfg = model_cfg if mu_model_cfg is None else mu_model_cfg
        mu_params = jax.lax.stop_gradient(mu_params)
        mu_hidden = response_hidden(mu_params, mu_cfg, *args, num_response=n, routes=routes)
        mu_w = vocab_head.head_weight(mu_params, mu_cfg)[0]
    kwargs = dict(w_vocab_axis=axis, mu_hidden=mu_hidden, mu_w=mu_w, topk_ids=topk_ids,
                  temperature=temperature)
    if head == "plain":  # O(tokens x vocab) memory
        out = vocab_head.plain_head(hidden, w, batch["response_tokens"], **kwargs)
    else:
        out = vocab_head.fused_head(hidden, w, batch["response_tokens"], mesh=mesh,
                                    token_chunk=model_cfg.head_token_chunk,
                                    vocab_chunk=model_cfg.head_vocab_chunk, logp_grad=logp_grad,
                                    on_correction=on_correction, **kwargs)
    return (out, moe) if with_routing else out


def response_logp(params, model_cfg, tokens, positions, valid, *, num_response: int,
                  temperature: float = 1.0):
    """Trainer-side log-probs [B, N] of the response tokens (the last N columns of ``tokens``),
    through the fused head."""
    batch = dict(tokens=tokens, positions=positions, valid=valid,
                 response_tokens=tokens[:, -num_response:])
    return response_head(params, model_cfg, batch, temperature=temperature)["logp"]
