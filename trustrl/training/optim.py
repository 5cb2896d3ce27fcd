"""The optimizer: AdamW with global-norm clipping on a warmup + constant / cosine schedule."""
from __future__ import annotations

import jax.numpy as jnp
import optax


SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(optim_cfg, total_steps: int):
    """Step k of W warmup steps uses lr * (k + 1) / W (the first step already moves); after the
    warmup the rate stays at lr ("constant") or follows a half cosine from lr down to
    lr * final_lr_frac at the last of ``total_steps`` optimizer steps ("cosine")."""
    lr, warmup = float(optim_cfg.learning_rate), max(int(optim_cfg.warmup_steps), 1)
    if optim_cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={optim_cfg.schedule!r} is not valid; choose one of "
                         f"{list(SCHEDULES)}")
    final = lr * float(optim_cfg.final_lr_frac)
    decay_steps = max(int(total_steps) - warmup, 1)

    def schedule(count):
        ramp = lr * jnp.minimum(1.0, (count + 1) / warmup)
        if optim_cfg.schedule == "constant":
            return ramp
        frac = jnp.clip((count - warmup + 1) / decay_steps, 0.0, 1.0)
        cosine = final + (lr - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return jnp.where(count < warmup, ramp, cosine)

    return schedule


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
    """AdamW with global-norm clipping on ``learning_rate_schedule``."""
    schedule = learning_rate_schedule(optim_cfg, total_steps)
    chain = [optax.clip_by_global_norm(optim_cfg.grad_clip)] if optim_cfg.grad_clip > 0 else []
    chain.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2,
                             weight_decay=optim_cfg.weight_decay))
    return optax.chain(*chain)
