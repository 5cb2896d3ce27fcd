"""The jitted, sharded, buffer-donating update and scoring functions.

One module-level pure function per phase:
    score(params, batch)                      -> pi_old log-probs at the rollout parameters
    train_step(state, batch, rollout_params)  -> (state, metrics)
    routing_metrics(params, batch)            -> a mixture of experts' routing diagnostics
Batches are dicts of [b, ...] arrays built from a Rollout (see ``rollout_batch``).

Mixture-of-experts models (``model_cfg.sparse_layers``): with ``routing_replay`` (R3) the
trainer's forward sends every token to the experts the rollout engine recorded
(``batch["routed_experts"]`` [b, P + N, M, k], M = the sparse layers in order) with gate
weights from its own router's softmax at those ids (``moe.replayed_weights``), so the router
keeps its gradient. ``router_aux_loss_coef`` > 0 adds Hugging Face's load-balancing loss.
Dense models run exactly the code they always ran (no new metrics).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from trustrl.core import divergences, losses
from trustrl.model import lora
from trustrl.model import moe as moe_lib
from trustrl.model import policy
from trustrl.model import transformer as model_lib
from trustrl.rollout.record import Rollout, routes_dtype

# The train step's vocabulary head: "loss_fused" (the fused head handed the loss's d loss / d logp,
# vocab_head.fused_head's logp_grad, for every elementwise method; the default), "fused" (the
# fused head with its recomputing backward) or "plain" ([tokens, vocab] logits; benchmarks).
HEADS = ("loss_fused", "fused", "plain")


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # optimizer steps taken (int32)
    params: Any
    opt_state: Any
    skipped: jax.Array       # updates skipped because the loss or gradient was non-finite


def state_shardings(model_cfg, tx, mesh) -> TrainState:
    """The TrainState's shardings from the logical rules: params as ``transformer.param_shardings``,
    every parameter-shaped optimizer leaf (Adam's mu / nu) as its parameter, the rest (step
    counters, the clip state) replicated. A LoRA model (``model_cfg.lora_rank``) trains only
    its adapters: the state holds those (``trained``), the frozen base lives outside it."""
    params_sh = trained(model_cfg, model_lib.param_shardings(model_cfg, mesh))
    replicated = NamedSharding(mesh, P())
    opt_sh = optax.tree_map_params(
        tx, lambda _, sh: sh,
        jax.eval_shape(tx.init, trained(model_cfg, model_lib.param_shapes(model_cfg))),
        params_sh, transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=params_sh, opt_state=opt_sh, skipped=replicated)


def trained(model_cfg, tree):
    """The part of a params-shaped ``tree`` the TrainState holds: all of it, or a LoRA model's
    adapters (``lora.split``; the frozen base is the train step's ``frozen`` argument)."""
    return lora.split(tree)[1] if model_cfg.lora_rank else tree


def policy_params(params, frozen=None):
    """The model's parameter tree from a TrainState's params: themselves, or with a LoRA
    model's frozen base ``frozen`` joined (``lora.combine``: no copy)."""
    return params if frozen is None else lora.combine(frozen, params)


def init_program(tx, shardings: TrainState | None = None):
    """The jitted params -> fresh TrainState. With ``shardings`` (``state_shardings``) every leaf
    is created directly with its sharding: Adam's moments are sharded like their parameters from
    the start, not replicated on every device; pinning the train step's output to the same
    shardings keeps its layout, so the step compiles once."""
    def init(p):
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                          skipped=jnp.zeros((), jnp.int32))
    return jax.jit(init) if shardings is None else jax.jit(init, out_shardings=shardings)


def init_train_state(params, tx, shardings: TrainState | None = None) -> TrainState:
    """A fresh TrainState (``init_program``)."""
    return init_program(tx, shardings)(params)


def abstract_state(params, tx, shardings: TrainState) -> TrainState:
    """The TrainState of abstract ``params`` (jax.ShapeDtypeStructs) as ShapeDtypeStructs with
    ``shardings``: what the train step is compiled for without allocating anything."""
    def spec(shape, sh):
        return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sh)
    shapes = jax.eval_shape(init_program(tx), params)
    return jax.tree.map(spec, shapes, shardings)


def rollout_batch(r: Rollout, advantages, old_logp=None) -> dict:
    """The arrays train_step consumes, all with a leading batch axis; ``routed_experts``
    [b, P + N, M, k] when the rollout recorded the experts it routed to."""
    batch = dict(tokens=r.tokens, valid=r.valid_mask, positions=r.positions,
                 response_tokens=r.response_tokens, response_mask=r.response_mask,
                 rollout_logp=r.rollout_logp, advantages=jnp.asarray(advantages, jnp.float32))
    if r.rollout_topk_ids is not None:
        batch.update(topk_ids=r.rollout_topk_ids, topk_logp=r.rollout_topk_logp)
    if r.routed_experts is not None:
        batch["routed_experts"] = r.routed_experts
    if old_logp is not None:
        batch["old_logp"] = old_logp
    return batch


def batch_shapes(rows: int, prompt_len: int, num_new: int, *, topk: int = 0,
                 old_logp: bool = False, routed_experts=None) -> dict:
    """The shapes / dtypes of ``rollout_batch``'s arrays for ``rows`` sequences of ``prompt_len``
    + ``num_new`` tokens (jax.ShapeDtypeStructs, unsharded): what the score pass and the train
    step are compiled for (trustrl.tools.aot_check). ``routed_experts``: a mixture-of-experts
    ModelConfig whose recorded experts the batch carries (routing replay), or None."""
    s = jax.ShapeDtypeStruct
    t = prompt_len + num_new
    out = dict(tokens=s((rows, t), jnp.int32), valid=s((rows, t), jnp.int32),
               positions=s((rows, t), jnp.int32), response_tokens=s((rows, num_new), jnp.int32),
               response_mask=s((rows, num_new), jnp.int32),
               rollout_logp=s((rows, num_new), jnp.float32), advantages=s((rows,), jnp.float32))
    if topk:
        out.update(topk_ids=s((rows, num_new, topk), jnp.int32),
                   topk_logp=s((rows, num_new, topk), jnp.float32))
    if old_logp:
        out["old_logp"] = s((rows, num_new), jnp.float32)
    if routed_experts is not None:
        c = routed_experts
        if not c.sparse_layers:
            raise ValueError(f"routed_experts: the model (family {c.family!r}) has no "
                             f"mixture-of-experts layers, so there are no experts to record")
        out["routed_experts"] = s((rows, t, len(c.sparse_layers), c.num_experts_per_tok),
                                  routes_dtype(c.num_experts))
    return out


def replay_routes(batch, model_cfg, routing_replay: bool):
    """The experts to replay, int32 [b, P + N, M, k], from ``batch["routed_experts"]`` (None
    without ``routing_replay``). Replay needs a mixture-of-experts model and recorded experts of
    the batch's shape: anything else is a ValueError, never a silent fallback to own routing."""
    if not routing_replay:
        return None
    if not model_cfg.sparse_layers:
        raise ValueError(f"model.routing_replay=True needs a mixture-of-experts model (family "
                         f"'qwen3_moe' with sparse layers); this model (family "
                         f"{model_cfg.family!r}) has none")
    routed = batch.get("routed_experts")
    if routed is None:
        raise ValueError("model.routing_replay=True but the batch has no routed_experts: the "
                         "rollout did not record the experts it routed to "
                         "(Rollout.routed_experts); record them or set "
                         "model.routing_replay=False")
    b, t = batch["tokens"].shape
    want = (b, t, len(model_cfg.sparse_layers), model_cfg.num_experts_per_tok)
    if tuple(routed.shape) != want:
        raise ValueError(f"routed_experts has shape {tuple(routed.shape)}; routing replay needs "
                         f"{want} ([rows, tokens, sparse layers, num_experts_per_tok])")
    if not jnp.issubdtype(routed.dtype, jnp.integer):
        raise ValueError(f"routed_experts must hold integer expert ids, got {routed.dtype}")
    return routed.astype(jnp.int32)


def strided_split(x, parts: int):
    """[b, ...] -> [parts, b / parts, ...], part i = rows i, i + parts, i + 2 parts, ... (a
    strided split keeps each device's rows on that device)."""
    return jnp.moveaxis(x.reshape(x.shape[0] // parts, parts, *x.shape[1:]), 1, 0)


def strided_join(x):
    """The inverse of ``strided_split``: [parts, b / parts, ...] -> [b, ...]."""
    return jnp.moveaxis(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _in_parts(fn, batch: dict, keys, microbatches: int, what: str):
    """``fn`` on ``batch``'s ``keys``, with ``microbatches`` > 1 on that many strided parts one
    after another (a lax.map) and the results joined back in row order."""
    rows = batch["tokens"].shape[0]
    if microbatches < 1 or rows % microbatches:
        raise ValueError(f"the {what} cannot split {rows} rows into microbatches="
                         f"{microbatches} (must be >= 1 and divide it)")
    if microbatches == 1:
        return fn({k: batch[k] for k in keys})
    parts = {k: strided_split(batch[k], microbatches) for k in keys}
    return jax.tree.map(strided_join, jax.lax.map(fn, parts))


_SCORE_KEYS = ("tokens", "positions", "valid", "response_tokens")


def score(params, batch, *, model_cfg, temperature: float = 1.0, mesh=None,
          microbatches: int = 1, routing_replay: bool = False):
    """Trainer-precision log-probs [b, N] of the sampled tokens: pi_old at the rollout
    parameters. ``microbatches`` > 1: the rows in that many parts, one after another (a
    lax.map), so the program's activations are one part's, whatever the iteration's size.
    ``routing_replay``: a mixture of experts replays ``batch["routed_experts"]`` (R3), as the
    train step does."""
    keys = _SCORE_KEYS
    if routing_replay:
        replay_routes(batch, model_cfg, True)  # a clear error without (valid) recorded experts
        keys += ("routed_experts",)

        def head(b):
            return policy.response_head(params, model_cfg, b, routes=b["routed_experts"].astype(
                jnp.int32), temperature=temperature, mesh=mesh)["logp"]
    else:
        def head(b):
            return policy.response_head(params, model_cfg, b, temperature=temperature,
                                        mesh=mesh)["logp"]
    return _in_parts(head, batch, keys, microbatches, "score pass")


def routing_metrics(params, batch, logp=None, *, model_cfg, temperature: float = 1.0,
                    mesh=None, microbatches: int = 1, routing_replay: bool = False) -> dict:
    """A mixture of experts' routing diagnostics for one iteration's batch (scalars):

    moe/routing_mismatch      fraction of (valid response token, sparse layer) pairs whose expert
                              SET differs between the rollout's recorded experts
                              (``batch["routed_experts"]``) and the trainer's own routing at
                              ``params`` (measured whether or not the run replays)
    moe/routing_flip_tokens   fraction of valid response tokens with such a flip in any layer
    moe/logp_absdiff_flipped  mean |logp - rollout_logp| over those tokens (0 if there are none)
    moe/logp_absdiff_unflipped  ... over the other valid response tokens (0 if none)

    A response token's routing is that of the position whose hidden state predicts it
    (P - 1 + j: its log-prob's). ``logp`` [b, N]: the trainer's log-probs the mismatch is
    measured on (the score pass's, which replays when the run does); None: computed here, by
    the own-routing forward without ``routing_replay``, by a replaying one with it.
    ``microbatches``: as ``score``'s."""
    if not model_cfg.sparse_layers:
        raise ValueError(f"routing metrics need a mixture-of-experts model; this model (family "
                         f"{model_cfg.family!r}) has no sparse layers")
    replay_routes(batch, model_cfg, True)  # checks presence and shape
    n = batch["response_tokens"].shape[1]
    prompt_len = batch["tokens"].shape[1] - n

    def own(b):
        # per part: the trainer's expert ids are compared with the recorded ones here and only
        # the count of flipped layers per token leaves (the iteration's [b, N, M, k] ids
        # would not fit beside the score pass's state on a pod: aot_check's "routing" phase)
        out, moe = policy.response_head(params, model_cfg, b, temperature=temperature,
                                        mesh=mesh, with_routing=True)
        mine = policy.response_logits_slice(moe["ids"], prompt_len, n)
        # the recorded ids as recorded (uint8 for <= 256 experts) until this part
        rec = policy.response_logits_slice(b["routed_experts"], prompt_len, n).astype(jnp.int32)
        flip = jnp.any(jnp.sort(rec, axis=-1) != jnp.sort(mine, axis=-1), axis=-1)  # [b,N,M]
        return {"logp": out["logp"], "flips": jnp.sum(flip, axis=-1, dtype=jnp.int32)}

    mine = _in_parts(own, batch, _SCORE_KEYS + ("routed_experts",), microbatches,
                     "routing metrics pass")
    if logp is None:
        logp = mine["logp"] if not routing_replay else score(
            params, batch, model_cfg=model_cfg, temperature=temperature, mesh=mesh,
            microbatches=microbatches, routing_replay=True)
    layers = len(model_cfg.sparse_layers)
    mask = batch["response_mask"] > 0
    maskf = mask.astype(jnp.float32)
    tokens = jnp.sum(maskf)
    flipped = ((mine["flips"] > 0) & mask).astype(jnp.float32)
    kept = maskf - flipped
    d = jnp.abs(jnp.asarray(logp, jnp.float32) - jnp.asarray(batch["rollout_logp"], jnp.float32))
    d = jnp.where(mask, d, 0.0)
    return {
        "moe/routing_mismatch": jnp.sum(mine["flips"] * maskf) / jnp.maximum(
            tokens * layers, 1.0),
        "moe/routing_flip_tokens": jnp.sum(flipped) / jnp.maximum(tokens, 1.0),
        "moe/logp_absdiff_flipped": jnp.sum(d * flipped) / jnp.maximum(jnp.sum(flipped), 1.0),
        "moe/logp_absdiff_unflipped": jnp.sum(d * kept) / jnp.maximum(jnp.sum(kept), 1.0),
    }


def moe_load_metrics(counts, tokens, k: int) -> dict:
    """Expert-load metrics from per-layer sums (``counts`` [M, X], ``tokens`` [M]):
    moe/load_max (the most tokens any expert of any layer got), moe/load_mean (tokens per
    expert when balanced, tokens * k / X, averaged over layers), moe/imbalance_max / _mean
    (a layer's max / mean: 1 is perfectly balanced; the worst layer / the layers' mean)."""
    stats = jax.vmap(lambda c, t: moe_lib.load_stats(c, t, k))(counts, tokens)
    return {"moe/load_max": jnp.max(stats["max"]), "moe/load_mean": jnp.mean(stats["mean"]),
            "moe/imbalance_max": jnp.max(stats["imbalance"]),
            "moe/imbalance_mean": jnp.mean(stats["imbalance"])}


def _combine_metrics(stacked: dict, tokens) -> dict:
    """Per-micro-batch metrics [n] -> one value: max / min for *_max / *_min, else the mean,
    over the micro-batches that have response tokens (an empty one reports 0 for everything)."""
    has = tokens > 0
    n = jnp.maximum(jnp.sum(has), 1)

    def one(k, v):
        if k.endswith("_max"):
            return jnp.where(jnp.any(has), jnp.max(jnp.where(has, v, -jnp.inf)), 0.0)
        if k.endswith("_min"):
            return jnp.where(jnp.any(has), jnp.min(jnp.where(has, v, jnp.inf)), 0.0)
        return jnp.sum(jnp.where(has, v, 0.0)) / n
    return {k: one(k, v) for k, v in stacked.items()}


def train_step(state: TrainState, batch: dict, rollout_params, frozen=None, *, model_cfg,
               loss_cfg, tx, mesh=None, rollout_model_cfg=None, temperature: float = 1.0,
               microbatches: int = 1, head: str = "loss_fused", on_correction=None,
               routing_replay: bool = False, router_aux_loss_coef: float = 0.0):
    """One optimizer step on a minibatch. Non-finite loss or gradient: update skipped.

    Logits are divided by the sampling temperature, so pi is measured on the same tempered
    distribution rollout_logp (mu) was recorded under.

    ``microbatches`` > 1 accumulates the gradient over that many micro-batches (a lax.scan, so
    activation memory is one micro-batch's). It is exact: every micro-batch contributes its
    loss *sum* (``losses.policy_loss_terms``) and the aggregation's denominator is computed once
    from the whole minibatch's mask, so loss and gradient equal the single-pass ones up to float
    summation order. Micro-batch ``i`` is rows i, i + n, i + 2n, ... (a strided split keeps each
    device's rows on that device). Metrics: max / min over the micro-batches with response tokens
    for *_max / *_min (exact), the mean of their per-micro-batch values otherwise (the
    whole-batch value when they hold equal numbers of tokens); ``loss/value`` is exact.

    LoRA (``model_cfg.lora_rank``): ``state.params`` are the adapters and ``frozen`` the base
    (``lora.split``); the loss is differentiated in the adapters only, so no gradient, moment
    or update of a frozen weight is ever formed.

    ``head``: one of HEADS; every choice computes the same loss and gradient. ``on_correction``:
    a diagnostics callback of the loss-fused head (vocab_head.fused_head).

    A mixture of experts (``model_cfg.sparse_layers``) runs its trunk through
    ``policy.response_head(with_routing=True)``. ``routing_replay`` (R3): every token goes to
    the experts in ``batch["routed_experts"]`` with gate weights from this router's softmax at
    those ids (so the router keeps its gradient); a batch without them is a ValueError. mu's
    hidden states (the exact-divergence methods) replay them too. ``router_aux_loss_coef`` > 0
    adds coef x ``moe.load_balancing_loss`` over all sparse layers, from forward_moe's sums
    over the batch's valid tokens (prompt and response columns: the ``valid`` mask); with
    micro-batches, the mean of the micro-batches' losses (as with Hugging Face's gradient
    accumulation). Logged either way: moe/aux_loss (the unscaled loss; ``loss/value`` includes
    coef x it) and the expert load of ``moe_load_metrics`` over the whole minibatch. Dense
    models: no new metrics.
    """
    method = loss_cfg.method
    spec = losses.method_spec(method)
    if head not in HEADS:
        raise ValueError(f"head={head!r} is not valid; choose one of {HEADS}")
    bsz = batch["response_mask"].shape[0]
    if microbatches < 1 or bsz % microbatches:
        raise ValueError(f"a minibatch of {bsz} sequences cannot be split into "
                         f"microbatches={microbatches} (must be >= 1 and divide it)")
    _, denom = losses.aggregation_weights(batch["response_mask"], loss_cfg.agg)
    denom = jnp.maximum(denom, 1e-8)
    is_moe = bool(model_cfg.sparse_layers)
    replay_routes(batch, model_cfg, routing_replay)  # a clear error before tracing the loss
    aux_coef = float(router_aux_loss_coef)
    if aux_coef < 0 or (aux_coef > 0 and not is_moe):
        raise ValueError(f"model.router_aux_loss_coef={router_aux_loss_coef} must be >= 0, and "
                         f"0 for a model without mixture-of-experts layers")

    loss_kw = dict(method=method, delta_low=loss_cfg.delta_low, delta_high=loss_cfg.delta_high,
                   is_cap=loss_cfg.is_cap,
                   alpha=loss_cfg.alpha if spec.needs_alpha else None,
                   # the method's own parameters: loss.<name>, else losses.PARAMS' default
                   params={k: loss_cfg.get(k, losses.PARAMS[k].default) for k in spec.params})

    def divergence_of(out, src):
        """The per-token divergence the method masks on: from the head's outputs and ``src``
        (the batch, or a chunk's inputs): mu's top-K log-probs, or M2PO's minibatch mask."""
        if spec.divergence == "topk":
            return getattr(divergences, f"topk_{spec.measure}")(out["topk_logp"],
                                                                src["topk_logp"])
        if spec.divergence == "full":
            return out[spec.measure]
        if spec.divergence == "m2po":
            return src.get("m2po_blocked")  # None without old_logp: policy_loss names it
        return None

    def chunk_grad(out, ex):  # the loss's d loss / d logp on a chunk of tokens (elementwise)
        return losses.logp_grad(out["logp"], ex["rollout_logp"], ex["adv"], ex["agg_w"],
                                old_logp=ex.get("old_logp"), divergence=divergence_of(out, ex),
                                **loss_kw)

    if bool(model_cfg.lora_rank) != (frozen is not None):
        raise ValueError("a LoRA model (model_cfg.lora_rank > 0) trains its adapters against a "
                         "frozen base: pass frozen= (and only then)")

    if spec.divergence == "m2po" and batch.get("old_logp") is not None:
        # M2PO's mask is a statistic of the whole minibatch: computed once, before the
        # micro-batch split, and split with the batch (exact for any train.microbatches)
        batch = {**batch, "m2po_blocked": losses.m2po_blocked(
            batch["old_logp"], batch["rollout_logp"], batch["response_mask"],
            loss_kw["params"]["m2po_threshold"]).astype(jnp.float32)}

    # the frozen base's layer stack as transformer.loop_storage passes it (on CPU: bit patterns,
    # so XLA does not hold a float32 copy of a bf16 base); inside this program only
    frozen = None if frozen is None else model_lib.loop_storage(frozen)

    def loss_fn(params, batch):
        params = policy_params(params, frozen)
        mask = batch["response_mask"]
        logp_grad = None
        # trm_seq's mask is sequence-level; without old_logp a *_recompute method is refused
        # below by policy_loss_terms with a clear error (nothing to fuse)
        missing = spec.needs_old_logp and batch.get("old_logp") is None
        if head == "loss_fused" and spec.elementwise and not missing:
            adv = jnp.asarray(batch["advantages"], jnp.float32)
            ex = {"rollout_logp": batch["rollout_logp"],
                  "adv": jnp.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, mask.shape),
                  "agg_w": losses.aggregation_weights(mask, loss_cfg.agg)[0] / denom}
            if spec.needs_old_logp:
                ex["old_logp"] = batch["old_logp"]
            if spec.divergence == "topk":
                ex["topk_logp"] = batch["topk_logp"]
            if spec.divergence == "m2po":
                ex["m2po_blocked"] = batch["m2po_blocked"]
            logp_grad = (chunk_grad, jax.tree.map(jax.lax.stop_gradient, ex))
        # The fused head (trustrl.model.vocab_head): float32 chunks, never [tokens, vocab] logits.
        # For
        # the exact methods mu's hidden states come from the frozen rollout parameters at the
        # rollout precision (storing V floats per token is "memory-prohibitive"). With
        # logp_grad it is loss-fused: the head's weight gradient is formed in its forward pass.
        head_kw = dict(
            temperature=temperature, mesh=mesh,
            topk_ids=batch["topk_ids"] if spec.divergence == "topk" else None,
            mu_params=rollout_params if spec.divergence == "full" else None,
            mu_model_cfg=rollout_model_cfg, logp_grad=logp_grad,
            head="plain" if head == "plain" else "fused", on_correction=on_correction)
        sums = {}
        if is_moe:
            out, moe = policy.response_head(
                params, model_cfg, batch, **head_kw, with_routing=True,
                routes=replay_routes(batch, model_cfg, routing_replay))
            aux = moe_lib.load_balancing_loss(jnp.sum(moe["counts"], axis=0),
                                              jnp.sum(moe["prob_sums"], axis=0),
                                              jnp.sum(moe["tokens"]))
            sums = jax.lax.stop_gradient(dict(aux=aux, counts=moe["counts"],
                                              tokens=moe["tokens"]))
        else:
            out = policy.response_head(params, model_cfg, batch, **head_kw)
        logp, entropy = out["logp"], out["entropy"]  # entropy: no gradient (a metric)
        divergence = divergence_of(out, batch)
        if spec.divergence == "binary":  # trm_seq: the sampled token's divergence, per token
            fn = getattr(divergences, loss_cfg.trm_divergence)
            divergence = fn(jax.lax.stop_gradient(logp), batch["rollout_logp"])
        terms = losses.policy_loss_terms(
            logp, batch["rollout_logp"], batch["advantages"], mask, agg=loss_cfg.agg,
            old_logp=batch.get("old_logp"), divergence=divergence, **loss_kw)
        metrics = dict(terms.metrics)
        maskf = mask.astype(jnp.float32)
        metrics["train/entropy"] = jnp.sum(entropy * maskf) / jnp.maximum(maskf.sum(), 1.0)
        loss = terms.loss_sum / denom
        if aux_coef > 0:  # each micro-batch's load-balancing loss, their mean over the minibatch
            loss = loss + (aux_coef / microbatches) * aux
        return loss, (metrics, sums)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
        (loss, (metrics, sums)), grads = grad_fn(state.params, batch)
    else:
        split = functools.partial(strided_split, parts=microbatches)

        def accumulate(acc, mb):
            (loss_i, (metrics_i, sums_i)), grads_i = grad_fn(state.params, mb)
            acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, (loss_i, grads_i))
            return acc, (metrics_i, jnp.sum(mb["response_mask"]), sums_i)

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        (loss, grads), (stacked, tokens, stacked_sums) = jax.lax.scan(
            accumulate, (jnp.zeros((), jnp.float32), zeros), jax.tree.map(split, batch))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        metrics = _combine_metrics(stacked, tokens)
        sums = jax.tree.map(lambda x: jnp.sum(x, axis=0), stacked_sums)
        if sums:
            sums["aux"] = sums["aux"] / microbatches
    if is_moe:
        metrics["moe/aux_loss"] = sums["aux"]
        metrics.update(moe_load_metrics(sums["counts"], sums["tokens"],
                                        model_cfg.num_experts_per_tok))
    metrics["loss/value"] = loss
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep_old = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(
        step=state.step + finite.astype(jnp.int32),
        params=keep_old(params, state.params),
        opt_state=keep_old(opt_state, state.opt_state),
        skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics.update({"train/grad_norm": grad_norm, "train/skipped": (~finite).astype(jnp.float32)})
    return new_state, metrics
