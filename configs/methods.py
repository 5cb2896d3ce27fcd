r"""Every paper method on the embedded default task (CPU): ``--config=configs/methods.py:NAME``.

NAME is one of PAPER_METHODS (thresholds from the paper's sanity test, sec. 5) or of
FAMILY_METHODS (icepop, kpop, opsm, geo_seq_mask, drpo, m2po, cppo, minpro_clip: issue 32's
methods at their references' defaults):

    dppo_binary_tv   DPPO Binary-TV, delta 0.15          dppo_binary_kl   DPPO Binary-KL, delta 0.05
    dppo_topk_tv     DPPO Top-K-TV (K=20), delta 0.15    dppo_topk_kl     DPPO Top-K-KL (K=20), 0.05
    dppo_full_tv     exact full-vocabulary TV, 0.15      grpo_clip_higher ppo_clip, eps 0.2 / 0.28
    pg_is            no mask, no cap                     pg_tis           no mask, IS cap 3
    minirl           clip test on pi/pi_old (recompute)  minirl_tis       as minirl, IS cap 3
    relax_both       sec. 6 ablation, alpha 0.1 (GRPO clip removed for mu < alpha on both sides)

Sweep: ``python launch/sweep.py --config=configs/methods.py --workdir=workdirs/methods``
runs every NAME x seed in get_sweep() as local processes.
"""
import ml_collections

from configs import default

INF = float("inf")
# name -> (loss.method, delta_low, delta_high, is_cap)
PAPER_METHODS = {
    "dppo_binary_tv": ("dppo_binary_tv", 0.15, 0.15, INF),
    "dppo_binary_kl": ("dppo_binary_kl", 0.05, 0.05, INF),
    "dppo_topk_tv": ("dppo_topk_tv", 0.15, 0.15, INF),
    "dppo_topk_kl": ("dppo_topk_kl", 0.05, 0.05, INF),
    "dppo_full_tv": ("dppo_full_tv", 0.15, 0.15, INF),
    "grpo_clip_higher": ("ppo_clip", 0.2, 0.28, INF),
    "pg_is": ("pg_is", 0.2, 0.2, INF),  # deltas unused by pg_is
    "pg_tis": ("pg_is", 0.2, 0.2, 3.0),
    "minirl": ("ppo_clip_recompute", 0.2, 0.28, INF),
    "minirl_tis": ("ppo_clip_recompute", 0.2, 0.28, 3.0),
    "relax_both": ("relax_both", 0.2, 0.28, INF),
}
# the trust-region family after DPPO (issue 32, docs/trust_region_family.md): each method's own
# parameters at the references' defaults (losses.PARAMS / configs/default.py's loss.<name>);
# delta_low / delta_high are the GRPO clip of opsm, m2po and minpro_clip (unused by the others;
# 0.2 / 0.28 in minpro_clip's reference tests: the MinPRO paper's own values are unknown)
FAMILY_METHODS = {name: (name, 0.2, 0.28, INF)
                  for name in ("icepop", "kpop", "opsm", "geo_seq_mask", "drpo", "m2po", "cppo",
                               "minpro_clip")}
CONFIGS = {**PAPER_METHODS, **FAMILY_METHODS}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: "NAME" or "NAME,VARIANT" with VARIANT a configs/default.py variant (e.g. tiny)."""
    name, _, variant = (arg or "dppo_binary_tv").partition(",")
    if name not in CONFIGS:
        raise ValueError(f"unknown method config {name!r}; valid: {sorted(CONFIGS)}")
    c = default.get_config(variant or "default")
    method, lo, hi, cap = CONFIGS[name]
    c.loss.method, c.loss.delta_low, c.loss.delta_high, c.loss.is_cap = method, lo, hi, cap
    c.loss.alpha = 0.1  # relax_* cutoff on mu
    if method.startswith("dppo_topk"):
        c.rollout.record_topk = 20 if variant != "tiny" else c.rollout.record_topk
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    """(config arg, overrides) of every run: each method x 3 seeds."""
    del arg
    return [{"config_arg": name, "seed": seed} for name in PAPER_METHODS for seed in range(3)]
