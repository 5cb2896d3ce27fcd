"""Per-token views of one batch, for the notebooks: which tokens a loss masks and why, how the
masked fraction moves with delta, and how the divergence estimates compare on real logits.

Nothing here re-implements a mask: ``blocked_tokens`` asks ``losses.policy_loss`` itself (a
token is blocked when its gradient is exactly zero, PAPER Eq. 23), and the divergences come from
``trustrl.core.divergences``.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from trustrl.core import advantages as adv_lib
from trustrl.core import divergences, losses
from trustrl.model import policy
from trustrl.training import step as ts
from trustrl.rollout.sampler import Sampler


def divergence_key(method: str) -> str | None:
    """The key of a ``drifted_batch`` holding the divergence ``method`` masks on (topk_tv,
    full_kl, ...), from losses.METHODS; None where the loss computes it from logp itself."""
    spec = losses.method_spec(method)
    return f"{spec.divergence}_{spec.measure}" if spec.divergence in ("topk", "full") else None


def blocked_tokens(logp, rollout_logp, advantages, mask, **loss_kwargs) -> np.ndarray:
    """[B, T] bool: response tokens with A != 0 whose policy_loss gradient is exactly zero.

    ``loss_kwargs`` are policy_loss's keyword arguments (method, delta_low, delta_high, ...).
    Tokens with A = 0 or outside the mask have zero gradient whatever the mask says, so they
    are never reported as blocked.
    """
    logp = jnp.asarray(logp, jnp.float32)
    grad = jax.grad(lambda lp: losses.policy_loss(lp, rollout_logp, advantages, mask,
                                                  **loss_kwargs)[0])(logp)
    adv = np.broadcast_to(np.asarray(advantages, np.float32).reshape(
        np.shape(advantages) + (1,) * (logp.ndim - np.ndim(advantages))), logp.shape)
    return (np.asarray(grad) == 0) & (np.asarray(mask) > 0) & (adv != 0)


def blocked_side(blocked, logp, rollout_logp, advantages) -> np.ndarray:
    """[B, T] str: "high" (A > 0 and pi > mu), "low" (A < 0 and pi < mu), "" where not blocked."""
    adv = np.asarray(advantages, np.float32)
    if adv.ndim == 1:
        adv = np.broadcast_to(adv[:, None], np.shape(logp))
    up, down = np.asarray(logp) > np.asarray(rollout_logp), np.asarray(logp) < np.asarray(
        rollout_logp)
    side = np.where((adv > 0) & up, "high", np.where((adv < 0) & down, "low", "?"))
    return np.where(blocked, side, "")


def token_rows(batch: dict, blocked, side, decode_token) -> list[dict]:
    """One dict per response token (row-major) with A != 0: text, mu, pi, |pi - mu|, A, blocked.

    batch: numpy dict with response_tokens, response_mask, rollout_logp, logp, advantages [B].
    decode_token: id -> str.
    """
    rows = []
    mask = np.asarray(batch["response_mask"]) > 0
    for b, t in zip(*np.nonzero(mask)):
        a = float(batch["advantages"][b])
        if a == 0:
            continue
        lp, lmu = float(batch["logp"][b, t]), float(batch["rollout_logp"][b, t])
        rows.append({"seq": int(b), "pos": int(t),
                     "token": decode_token(int(batch["response_tokens"][b, t])),
                     "mu": float(np.exp(lmu)), "pi": float(np.exp(lp)),
                     "tv": abs(float(np.exp(lp)) - float(np.exp(lmu))), "adv": a,
                     "blocked": bool(blocked[b, t]), "side": str(side[b, t]),
                     "logp": lp, "rollout_logp": lmu})
    return rows


def show_table(rows: list[dict], columns=None, max_rows: int = 40):
    """A pandas DataFrame when pandas is installed (the notebook renders it); without pandas the
    table is printed as plain text and None is returned."""
    columns = columns or ["seq", "pos", "token", "mu", "pi", "tv", "adv", "blocked", "side"]
    rows = rows[:max_rows]
    try:
        import pandas as pd
    except ImportError:
        fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else repr(v) if isinstance(v, str) \
            else str(v)
        cells = [[fmt(r[c]) for c in columns] for r in rows]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
        line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
        print("\n".join([line(columns)] + [line(row) for row in cells]))
        return None
    return pd.DataFrame(rows, columns=columns)


@functools.partial(jax.jit, static_argnames=("model_cfg", "num_response", "temperature"))
def jit_response_logits(params, model_cfg, tokens, positions, valid, *, num_response,
                        temperature=1.0):
    """Jitted policy.response_logits: tempered logits [B, N, V] of the N response tokens."""
    return policy.response_logits(params, model_cfg, tokens, positions, valid,
                                  num_response=num_response, temperature=temperature)


def drifted_batch(run, state, key, updates: int = 8) -> dict:
    """One rollout batch whose current policy pi has moved away from its rollout policy mu.

    Samples one iteration's prompts with ``run.sampler`` at ``state``'s parameters (mu, rollout
    precision), takes ``updates`` optimizer steps (``run.train_step``) on that same batch, then
    scores the same tokens with the updated parameters (pi, trainer precision). ``state`` is
    copied first (the train step donates its input). Returns numpy arrays: the rollout batch
    (tokens, response_tokens, response_mask, rollout_logp, topk_ids, topk_logp, advantages,
    rewards), logp = log pi of the sampled tokens, and the divergences D(mu || pi) of every
    estimate: binary_tv / binary_kl, topk_tv / topk_kl (mu's recorded top-K set), full_tv /
    full_kl (mu's logits recomputed from the rollout parameters, as the train step does).
    """
    cfg, env, g = run.cfg, run.env, run.cfg.rollout.group_size
    state = jax.tree.map(jnp.copy, state)
    params_roll = run.rollout_params(state.params)
    examples = next(run.prompt_iter)
    sampler = run.sampler
    if not sampler.cfg.record_topk and cfg.rollout.record_topk:  # the run's method reads no
        sampler = Sampler(sampler.model, dataclasses.replace(  # top-K: record it here
            sampler.cfg, record_topk=cfg.rollout.record_topk),
            batch_sharding=sampler.batch_sharding)
    r = sampler.generate(params_roll, env.encode_prompts(examples), g, key)
    answers = [ex["answer"] for ex in examples for _ in range(g)]
    rewards = np.asarray(env.score(env.decode_responses(r), answers), np.float32)
    adv = adv_lib.compute_advantages(rewards, g, cfg.loss.advantage)
    batch = ts.rollout_batch(r, adv)
    for _ in range(updates):
        state, _ = run.train_step(state, batch, params_roll)
        jax.block_until_ready(state)  # one program in flight (see sharding.cpu_sync)
    temp, n = float(cfg.rollout.temperature), r.response_tokens.shape[1]
    args = (r.tokens, r.positions, r.valid_mask)
    logits_pi = jit_response_logits(run.policy_params(state.params), run.model_cfg, *args,
                                    num_response=n, temperature=temp)
    logits_mu = jit_response_logits(params_roll, run.rollout_cfg, *args, num_response=n,
                                    temperature=temp)
    logp_full = jax.nn.log_softmax(logits_pi.astype(jnp.float32), axis=-1)
    logp = jnp.take_along_axis(logp_full, r.response_tokens[..., None], axis=-1)[..., 0]
    out = {k: np.asarray(v) for k, v in batch.items()}
    out.update(rewards=rewards, logp=np.asarray(logp),
               binary_tv=np.asarray(divergences.binary_tv(logp, r.rollout_logp)),
               binary_kl=np.asarray(divergences.binary_kl(logp, r.rollout_logp)),
               full_tv=np.asarray(divergences.full_tv(logits_mu, logits_pi)),
               full_kl=np.asarray(divergences.full_kl(logits_mu, logits_pi)))
    if r.rollout_topk_ids is not None:
        at_ids = jnp.take_along_axis(logp_full, r.rollout_topk_ids, axis=-1)
        out.update(topk_tv=np.asarray(divergences.topk_tv(at_ids, r.rollout_topk_logp)),
                   topk_kl=np.asarray(divergences.topk_kl(at_ids, r.rollout_topk_logp)))
    return out


def masked_fraction_sweep(batch: dict, method: str, deltas, **loss_kwargs) -> np.ndarray:
    """loss/masked_frac of ``method`` on a fixed batch for each delta (delta_low = delta_high).

    The batch is a ``drifted_batch`` dict; top-K / full methods take their divergence from it.
    """
    key = divergence_key(method)
    div = batch[key] if key else None
    fracs = []
    for d in deltas:
        _, m = losses.policy_loss(batch["logp"], batch["rollout_logp"], batch["advantages"],
                                  batch["response_mask"], method=method, delta_low=float(d),
                                  delta_high=float(d), divergence=div, **loss_kwargs)
        fracs.append(float(m["loss/masked_frac"]))
    return np.asarray(fracs)


def divergence_estimates(logits_mu, logits_pi, sampled_ids, k: int) -> dict:
    """Binary, top-K and exact TV / KL(mu || pi) per token, all from ONE pair of logits.

    logits_mu, logits_pi: [..., V]; sampled_ids: [...]. The top-K set is mu's K most likely
    tokens with the sampled one forced in (``divergences.build_topk_set``, the sampler's rule).
    Because every estimate partitions the same two distributions, binary <= top-K <= exact holds
    token by token (up to float rounding). Returns numpy [...] arrays.
    """
    lmu = jax.nn.log_softmax(jnp.asarray(logits_mu, jnp.float32), axis=-1)
    lpi = jax.nn.log_softmax(jnp.asarray(logits_pi, jnp.float32), axis=-1)
    ids = jnp.asarray(sampled_ids, jnp.int32)
    at = lambda lp: jnp.take_along_axis(lp, ids[..., None], axis=-1)[..., 0]
    topk_ids, topk_lmu = divergences.build_topk_set(lmu, ids, k)
    topk_lpi = jnp.take_along_axis(lpi, topk_ids, axis=-1)
    out = {"binary_tv": divergences.binary_tv(at(lpi), at(lmu)),
           "topk_tv": divergences.topk_tv(topk_lpi, topk_lmu),
           "full_tv": divergences.full_tv(lmu, lpi),
           "binary_kl": divergences.binary_kl(at(lpi), at(lmu)),
           "topk_kl": divergences.topk_kl(topk_lpi, topk_lmu),
           "full_kl": divergences.full_kl(lmu, lpi)}
    return {name: np.asarray(v) for name, v in out.items()}
