"""The Bradley-Terry preference loss for reward-model training.

Bradley & Terry (1952) model a comparison as P(a beats b) = sigmoid(s_a - s_b). A reward model r
trained on preference pairs (x, y_chosen, y_rejected) maximises the likelihood of the observed
labels (Stiennon et al. 2020, "Learning to summarize from human feedback", Eq. 1; Ouyang et al.
2022, InstructGPT, Eq. 1):

    loss = sum_i w_i * -log sigmoid(c_i - r_i - m_i) / sum_i w_i
         = sum_i w_i * softplus(-(c_i - r_i - m_i)) / sum_i w_i

c_i = r(x_i, y_chosen_i), r_i = r(x_i, y_rejected_i) the two scores, m_i an optional margin (the
Llama-2 reward model's "preference rating" margin, Touvron et al. 2023, Eq. 2: the chosen score
must beat the rejected one by m_i before the loss goes flat) and w_i optional per-pair weights.
Without weights the loss is the plain mean over pairs; with weights it is the WEIGHTED mean (so
0/1 weights mask padding pairs out exactly; all-zero weights give a loss of 0).

Numerics: float32; the softplus form is stable for any score difference (softplus(-z) ~ -z for
z << 0, ~ exp(-z) for z >> 0), so margins of +-100 give finite values and gradients
(d loss / d c_i = -w_i sigmoid(-(c_i - r_i - m_i)) / sum w, d loss / d r_i its negative).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def bradley_terry_loss(chosen, rejected, *, margin=None, weights=None):
    """(loss, metrics) of the Bradley-Terry loss (module docstring) over pairs of scores.

    chosen, rejected: score arrays of one shape (usually [N]); margin and weights broadcast to
    it. metrics (float32 scalars, weighted like the loss):
      "bt/loss"         the loss,
      "bt/accuracy"     fraction of pairs with chosen > rejected, a tie counting 0.5,
      "bt/margin_mean"  mean of chosen - rejected (the margin argument not subtracted).
    """
    chosen = jnp.asarray(chosen, jnp.float32)
    rejected = jnp.asarray(rejected, jnp.float32)
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen {chosen.shape} and rejected {rejected.shape} scores must have "
                         f"one shape")
    diff = chosen - rejected
    z = diff if margin is None else diff - jnp.asarray(margin, jnp.float32)
    per_pair = jax.nn.softplus(-z)
    if weights is None:
        w = jnp.ones_like(diff)
    else:
        w = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), diff.shape)
    total = jnp.sum(w)
    denom = jnp.where(total == 0, 1.0, total)

    def mean(x):
        return jnp.sum(w * x) / denom

    loss = mean(per_pair)
    wins = jnp.where(diff > 0, 1.0, jnp.where(diff == 0, 0.5, 0.0))
    metrics = {"bt/loss": loss, "bt/accuracy": jax.lax.stop_gradient(mean(wins)),
               "bt/margin_mean": jax.lax.stop_gradient(mean(diff))}
    return loss, metrics
