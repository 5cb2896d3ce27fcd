"""The jitted, sharded, buffer-donating update and scoring functions.

One module-level pure function per phase:
    score(params, batch)                      -> pi_old log-probs at the rollout parameters
    train_step(state, batch, rollout_params)  -> (state, metrics)
Batches are dicts of [b, ...] arrays built from a Rollout (see ``rollout_batch``).
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
from trustrl.model import policy
from trustrl.model import transformer as model_lib
from trustrl.rollout.record import Rollout

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
    counters, the clip state) replicated."""
    params_sh = model_lib.param_shardings(model_cfg, mesh)
    replicated = NamedSharding(mesh, P())
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh,
                                   jax.eval_shape(tx.init, model_lib.param_shapes(model_cfg)),
                                   params_sh, transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=params_sh, opt_state=opt_sh, skipped=replicated)


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
    """The arrays train_step consumes, all with a leading batch axis."""
    batch = dict(tokens=r.tokens, valid=r.valid_mask, positions=r.positions,
                 response_tokens=r.response_tokens, response_mask=r.response_mask,
                 rollout_logp=r.rollout_logp, advantages=jnp.asarray(advantages, jnp.float32))
    if r.rollout_topk_ids is not None:
        batch.update(topk_ids=r.rollout_topk_ids, topk_logp=r.rollout_topk_logp)
    if old_logp is not None:
        batch["old_logp"] = old_logp
    return batch


def batch_shapes(rows: int, prompt_len: int, num_new: int, *, topk: int = 0,
                 old_logp: bool = False) -> dict:
    """The shapes / dtypes of ``rollout_batch``'s arrays for ``rows`` sequences of ``prompt_len``
    + ``num_new`` tokens (jax.ShapeDtypeStructs, unsharded): what the score pass and the train
    step are compiled for (trustrl.tools.aot_check)."""
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
    return out


def strided_split(x, parts: int):
    """[b, ...] -> [parts, b / parts, ...], part i = rows i, i + parts, i + 2 parts, ... (a
    strided split keeps each device's rows on that device)."""
    return jnp.moveaxis(x.reshape(x.shape[0] // parts, parts, *x.shape[1:]), 1, 0)


def strided_join(x):
    """The inverse of ``strided_split``: [parts, b / parts, ...] -> [b, ...]."""
    return jnp.moveaxis(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def score(params, batch, *, model_cfg, temperature: float = 1.0, mesh=None,
          microbatches: int = 1):
    """Trainer-precision log-probs [b, N] of the sampled tokens: pi_old at the rollout
    parameters. ``microbatches`` > 1: the rows in that many parts, one after another (a
    lax.map), so the program's activations are one part's, whatever the iteration's size."""
    keys = ("tokens", "positions", "valid", "response_tokens")
    rows = batch["tokens"].shape[0]
    if microbatches < 1 or rows % microbatches:
        raise ValueError(f"the score pass cannot split {rows} rows into microbatches="
                         f"{microbatches} (must be >= 1 and divide it)")
    head = lambda b: policy.response_head(params, model_cfg, b, temperature=temperature,
                                          mesh=mesh)["logp"]
    if microbatches == 1:
        return head({k: batch[k] for k in keys})
    parts = {k: strided_split(batch[k], microbatches) for k in keys}
    return strided_join(jax.lax.map(head, parts))


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


def train_step(state: TrainState, batch: dict, rollout_params, *, model_cfg, loss_cfg, tx,
               mesh=None, rollout_model_cfg=None, temperature: float = 1.0,
               microbatches: int = 1, head: str = "loss_fused", on_correction=None):
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

    ``head``: one of HEADS; every choice computes the same loss and gradient. ``on_correction``:
    a diagnostics callback of the loss-fused head (vocab_head.fused_head).
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

    loss_kw = dict(method=method, delta_low=loss_cfg.delta_low, delta_high=loss_cfg.delta_high,
                   is_cap=loss_cfg.is_cap,
                   alpha=loss_cfg.alpha if spec.needs_alpha else None)

    def divergence_of(out, mu_topk_logp):
        """The per-token divergence the method masks on, from the head's outputs."""
        if spec.divergence == "topk":
            return getattr(divergences, f"topk_{spec.measure}")(out["topk_logp"], mu_topk_logp)
        if spec.divergence == "full":
            return out[spec.measure]
        return None

    def chunk_grad(out, ex):  # the loss's d loss / d logp on a chunk of tokens (elementwise)
        return losses.logp_grad(out["logp"], ex["rollout_logp"], ex["adv"], ex["agg_w"],
                                old_logp=ex.get("old_logp"),
                                divergence=divergence_of(out, ex.get("mu_topk_logp")),
                                **loss_kw)

    def loss_fn(params, batch):
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
                ex["mu_topk_logp"] = batch["topk_logp"]
            logp_grad = (chunk_grad, jax.tree.map(jax.lax.stop_gradient, ex))
        # The fused head (trustrl.model.vocab_head): float32 chunks, never [tokens, vocab] logits.
        # For
        # the exact methods mu's hidden states come from the frozen rollout parameters at the
        # rollout precision (storing V floats per token is "memory-prohibitive"). With
        # logp_grad it is loss-fused: the head's weight gradient is formed in its forward pass.
        out = policy.response_head(
            params, model_cfg, batch, temperature=temperature, mesh=mesh,
            topk_ids=batch["topk_ids"] if spec.divergence == "topk" else None,
            mu_params=rollout_params if spec.divergence == "full" else None,
            mu_model_cfg=rollout_model_cfg, logp_grad=logp_grad,
            head="plain" if head == "plain" else "fused", on_correction=on_correction)
        logp, entropy = out["logp"], out["entropy"]  # entropy: no gradient (a metric)
        divergence = divergence_of(out, batch.get("topk_logp"))
        if spec.divergence == "binary":  # trm_seq: the sampled token's divergence, per token
            fn = getattr(divergences, loss_cfg.trm_divergence)
            divergence = fn(jax.lax.stop_gradient(logp), batch["rollout_logp"])
        terms = losses.policy_loss_terms(
            logp, batch["rollout_logp"], batch["advantages"], mask, agg=loss_cfg.agg,
            old_logp=batch.get("old_logp"), divergence=divergence, **loss_kw)
        metrics = dict(terms.metrics)
        maskf = mask.astype(jnp.float32)
        metrics["train/entropy"] = jnp.sum(entropy * maskf) / jnp.maximum(maskf.sum(), 1.0)
        return terms.loss_sum / denom, metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
        (loss, metrics), grads = grad_fn(state.params, batch)
    else:
        split = functools.partial(strided_split, parts=microbatches)

        def accumulate(acc, mb):
            (loss_i, metrics_i), grads_i = grad_fn(state.params, mb)
            acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, (loss_i, grads_i))
            return acc, (metrics_i, jnp.sum(mb["response_mask"]))

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        (loss, grads), (stacked, tokens) = jax.lax.scan(
            accumulate, (jnp.zeros((), jnp.float32), zeros), jax.tree.map(split, batch))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        metrics = _combine_metrics(stacked, tokens)
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
