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
