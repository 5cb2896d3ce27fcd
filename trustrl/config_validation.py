"""Start-up validation of a run config: every bad value fails with the valid choices."""
from __future__ import annotations

import math

from trustrl import advantages, losses

DTYPES = ("float32", "bfloat16")
OVERLONG = ("none", "filter", "penalty")
TEMPLATES = ("plain", "chat")


def _choice(name, value, valid):
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(valid)}")


def _positive(name, value, allow_zero=False):
    ok = value >= 0 if allow_zero else value > 0
    if not (isinstance(value, (int, float)) and ok):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate(cfg):
    from trustrl import rewards  # the task registry
    _choice("loss.method", cfg.loss.method, losses.METHODS)
    _choice("loss.agg", cfg.loss.agg, losses.AGGREGATIONS)
    _choice("loss.advantage", cfg.loss.advantage, tuple(advantages.ADVANTAGE_FNS))
    _choice("loss.trm_divergence", cfg.loss.trm_divergence, ("binary_tv", "binary_kl"))
    for k in ("delta_low", "delta_high", "is_cap"):
        _positive(f"loss.{k}", cfg.loss[k])
    if cfg.loss.method.startswith("relax") and not 0 < cfg.loss.alpha <= 1:
        raise ValueError(f"loss.alpha must be in (0, 1] for {cfg.loss.method}, got {cfg.loss.alpha}")
    if cfg.loss.method in ("dppo_topk_tv", "dppo_topk_kl") and cfg.rollout.record_topk < 1:
        raise ValueError(f"{cfg.loss.method} needs rollout.record_topk >= 1 (K of mu's top-K)")
    _choice("rollout.dtype", cfg.rollout.dtype, DTYPES)
    _choice("model.dtype", cfg.model.dtype, DTYPES)
    _choice("model.param_dtype", cfg.model.param_dtype, DTYPES)
    _choice("rollout.overlong", cfg.rollout.overlong, OVERLONG)
    _choice("task.template", cfg.task.template, TEMPLATES)
    _choice("task.name", cfg.task.name, tuple(rewards.TASKS))
    for k in ("prompts_per_iter", "group_size", "max_new_tokens", "temperature"):
        _positive(f"rollout.{k}", cfg.rollout[k])
    for k in ("iterations", "epochs", "minibatches"):
        _positive(f"train.{k}", cfg.train[k])
    _positive("optim.learning_rate", cfg.optim.learning_rate)
    _positive("optim.grad_clip", cfg.optim.grad_clip, allow_zero=True)
    batch = cfg.rollout.prompts_per_iter * cfg.rollout.group_size
    if batch % cfg.train.minibatches:
        raise ValueError(f"prompts_per_iter * group_size = {batch} is not divisible by "
                         f"train.minibatches={cfg.train.minibatches}")
    sizes = [cfg.mesh[a] for a in ("data", "fsdp", "tensor")]
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive with at most one -1, got {dict(cfg.mesh)}")
    if not math.isfinite(cfg.loss.delta_low) or not math.isfinite(cfg.loss.delta_high):
        raise ValueError("loss.delta_low / delta_high must be finite")
    if not cfg.task.reward_correct > cfg.task.reward_wrong:
        raise ValueError(f"task.reward_correct ({cfg.task.reward_correct}) must be greater than "
                         f"task.reward_wrong ({cfg.task.reward_wrong})")
    if cfg.warmstart.steps and cfg.model.hf_dir:
        raise ValueError("warmstart.steps > 0 with model.hf_dir: the warm start is for models "
                         "trained from scratch; set warmstart.steps=0 for a pretrained model")
    t = cfg.task
    _positive("task.filler_words", t.filler_words, allow_zero=True)
    if t.filler_words:
        _positive("task.filler_zipf", t.filler_zipf)
        if not 0 <= t.filler_min <= t.filler_max:
            raise ValueError(f"need 0 <= task.filler_min <= task.filler_max, got "
                             f"{t.filler_min}, {t.filler_max}")
    _positive("task.filter_samples", t.filter_samples, allow_zero=True)
    if t.filter_samples:
        _positive("task.filter_pool", t.filter_pool)
        if not 0 <= t.solve_band_low <= t.solve_band_high <= 1:
            raise ValueError(f"need 0 <= task.solve_band_low <= task.solve_band_high <= 1, got "
                             f"{t.solve_band_low}, {t.solve_band_high}")
