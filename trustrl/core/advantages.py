"""Outcome-reward advantages with a group baseline.

Rewards come in contiguous groups: the ``group_size`` responses to one prompt are adjacent,
so rewards [B] reshape to [B / group_size, group_size]. Every method returns one advantage per
response [B]; the loss broadcasts it to every token of that response.

* group_mean (paper default, Dr. GRPO): A = R - mean(group R). No std division.
* grpo: A = (R - mean) / (std + eps), population std. Zero-variance groups give A = 0.
* rloo: A = R - mean of the OTHER responses in the group = n / (n - 1) * (R - mean).
"""
from __future__ import annotations

import jax.numpy as jnp


def _grouped(rewards, group_size):
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be [B], got shape {rewards.shape}")
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"batch of {rewards.shape[0]} rewards is not a multiple of "
                         f"group_size={group_size}")
    return rewards.reshape(-1, group_size)


def group_mean(rewards, group_size):
    r = _grouped(rewards, group_size)
    return (r - r.mean(axis=1, keepdims=True)).reshape(-1)


def grpo(rewards, group_size, eps=1e-6):
    r = _grouped(rewards, group_size)
    centred = r - r.mean(axis=1, keepdims=True)
    std = jnp.sqrt(jnp.mean(centred**2, axis=1, keepdims=True))
    # A zero-variance group has centred == 0 exactly, so it stays 0 regardless of eps.
    return (centred / (std + eps)).reshape(-1)


def rloo(rewards, group_size):
    if group_size < 2:
        raise ValueError("rloo needs group_size >= 2 (leave-one-out baseline)")
    r = _grouped(rewards, group_size)
    return (group_size / (group_size - 1) * (r - r.mean(axis=1, keepdims=True))).reshape(-1)


ADVANTAGE_FNS = {"group_mean": group_mean, "grpo": grpo, "rloo": rloo}


def compute_advantages(rewards, group_size, method="group_mean"):
    """Advantages [B] from rewards [B] in contiguous groups of ``group_size``."""
    if method not in ADVANTAGE_FNS:
        raise ValueError(f"unknown advantage method {method!r}; valid: {sorted(ADVANTAGE_FNS)}")
    return ADVANTAGE_FNS[method](rewards, group_size)


# --- multi-turn episodes -----------------------------------------------------------------------
LEVELS = ("episode", "turn")


def turn_advantages(turn_rewards, num_turns, group_size, method="group_mean", eps=1e-6):
    """Per-turn advantages [B, K] of multi-turn episodes (host numpy).

    ``turn_rewards`` [B, K]: the reward of each played turn (K = max turns; 0 after the last),
    ``num_turns`` [B]; episodes in contiguous groups of ``group_size`` (same environment seed).
    Turn k's value is its return-to-go G[i, k] = sum_{j >= k} r[i, j]; its baseline comes from
    the episodes of the same group that played turn k (n of them): group_mean A = G - mean,
    grpo (G - mean) / (population std + eps), rloo n / (n - 1) (G - mean) (0 when n = 1).
    Turns not played get 0. With one turn per episode this is ``compute_advantages`` of the
    rewards."""
    import numpy as np
    if method not in ADVANTAGE_FNS:
        raise ValueError(f"unknown advantage method {method!r}; valid: {sorted(ADVANTAGE_FNS)}")
    r = np.asarray(turn_rewards, np.float64)
    b, k = r.shape
    if b % group_size:
        raise ValueError(f"batch of {b} episodes is not a multiple of group_size={group_size}")
    played = np.arange(k)[None, :] < np.asarray(num_turns)[:, None]
    g = np.where(played, np.cumsum(r[:, ::-1], axis=1)[:, ::-1], 0.0)
    g, played = g.reshape(-1, group_size, k), played.reshape(-1, group_size, k)
    n = played.sum(axis=1, keepdims=True)
    mean = g.sum(axis=1, keepdims=True) / np.maximum(n, 1)
    centred = np.where(played, g - mean, 0.0)
    if method == "grpo":
        std = np.sqrt((centred ** 2).sum(axis=1, keepdims=True) / np.maximum(n, 1))
        centred = centred / (std + eps)
    elif method == "rloo":
        centred = np.where(n > 1, centred * n / np.maximum(n - 1, 1), 0.0)
    return centred.reshape(b, k).astype(np.float32)
