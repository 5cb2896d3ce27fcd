"""The trust-region family after DPPO (issue 32): icepop, kpop, opsm, geo_seq_mask.

Hand-computed masks and gradients, test-only NumPy transcriptions of the reference code (which
file, which commit: each function's docstring), aggregation, micro-batch exactness, the
loss-fused head's logp_grad, bad parameters (here and through config_validation.validate)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustrl.core import losses
from trustrl.core.losses import METHODS, policy_loss, policy_loss_terms

NEW = ("icepop", "kpop", "opsm", "geo_seq_mask", "drpo", "m2po", "cppo", "minpro_clip")


def grad(method, pi, mu, adv, mask=None, agg="token-sum", **kw):
    lp, lmu = jnp.log(jnp.asarray(pi, jnp.float32)), jnp.log(jnp.asarray(mu, jnp.float32))
    mask = jnp.ones_like(lp) if mask is None else jnp.asarray(mask, jnp.float32)
    kw.setdefault("delta_low", 0.2)
    kw.setdefault("delta_high", 0.28)
    f = lambda x: policy_loss(x, lmu, jnp.asarray(adv, jnp.float32), mask, method=method,
                              agg=agg, **kw)[0]
    return np.asarray(jax.grad(f)(lp))


def bern_kl(p, q):  # KL(Bernoulli(p) || Bernoulli(q)), float64
    return p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))


# ------------------------------------------------------------------------- hand-computed

def test_icepop_hand():
    # r = .45 | .55 | 4.5 | 5.5 | 1 ; both advantage signs: outside [0.5, 5] is masked
    pi, mu = [[0.09, 0.11, 0.45, 0.55, 0.5]], [[0.2, 0.2, 0.1, 0.1, 0.5]]
    adv = [[1.0, -1.0, -1.0, 1.0, -1.0]]
    r = np.array(pi) / np.array(mu)
    np.testing.assert_allclose(grad("icepop", pi, mu, adv),
                               -np.array([[0, 1, 1, 0, 1]]) * r * np.array(adv), rtol=1e-5)
    # a narrower band [0.5, 2] also masks r = 4.5
    g = grad("icepop", pi, mu, adv, params={"icepop_low": 0.5, "icepop_high": 2.0})
    np.testing.assert_allclose(g, -np.array([[0, 1, 0, 0, 1]]) * r * np.array(adv), rtol=1e-5)


def test_kpop_hand():
    # (pi, mu): (.5, .8): KL(mu||pi) = .8 ln 1.6 + .2 ln .4 = .1927, KL(pi||mu) = .2231 -> the
    # larger direction (.2231 > phi = .2) masks it (DPPO Binary-KL at .2 would keep it);
    # (.6, .5): .0204 / .0201 kept; rare (1e-2, 1e-4), r = 100: .0095 / .0362 kept;
    # (.2, .5): .2231 / .1927 masked. Both advantage signs.
    pi, mu = [[0.5, 0.6, 1e-2, 0.2]], [[0.8, 0.5, 1e-4, 0.5]]
    adv = [[-1.0, 1.0, 1.0, 1.0]]
    kl = np.maximum(bern_kl(np.array(pi), np.array(mu)), bern_kl(np.array(mu), np.array(pi)))
    np.testing.assert_allclose(kl, [[0.2231, 0.0204, 0.0362, 0.2231]], atol=2e-4)
    r = np.array(pi) / np.array(mu)
    g = grad("kpop", pi, mu, adv, params={"kpop_phi": 0.2})
    np.testing.assert_allclose(g, -np.array([[0, 1, 1, 0]]) * r * np.array(adv), rtol=1e-5)
    # the default phi = 2.0 keeps all four
    np.testing.assert_allclose(grad("kpop", pi, mu, adv), -r * np.array(adv), rtol=1e-5)
    _, m = policy_loss(jnp.log(jnp.array(pi)), jnp.log(jnp.array(mu)), jnp.array(adv),
                       jnp.ones((1, 4)), method="kpop", delta_low=.2, delta_high=.2,
                       params={"kpop_phi": 0.2})
    assert float(m["loss/masked_frac"]) == pytest.approx(0.5)
    assert float(m["loss/div_max"]) == pytest.approx(0.2231, abs=2e-4)


def test_opsm_hand():
    # row 0, A < 0: mean log(mu/pi) = ln(1.2) / 3 = .0608 > 1e-4: the whole row is masked
    # row 1, A < 0: (0 + ln(.5/.6)) / 2 = -.091 (padding not counted): kept; r = 1.2 not clipped
    # row 2, A > 0: never sequence-masked; token 1 r = 1.667 > 1 + .28: clipped (GRPO clip)
    pi = [[0.5, 0.5, 0.5], [0.5, 0.6, 0.9], [0.5, 0.5, 0.5]]
    mu = [[0.5, 0.5, 0.6], [0.5, 0.5, 0.1], [0.5, 0.3, 0.6]]
    adv = [-1.0, -1.0, 1.0]
    mask = [[1, 1, 1], [1, 1, 0], [1, 1, 1]]
    r = np.array(pi) / np.array(mu)
    want = -np.array([[0, 0, 0], [1, 1, 0], [1, 0, 1]]) * r * np.array(adv)[:, None]
    np.testing.assert_allclose(grad("opsm", pi, mu, adv, mask), want, rtol=1e-5)
    # delta = .07 > .0608: row 0 is kept (no token of it is clipped: r = 1, 1, .833 > .8)
    g = grad("opsm", pi, mu, adv, mask, params={"opsm_delta": 0.07})
    want[0] = -r[0] * adv[0]
    np.testing.assert_allclose(g, want, rtol=1e-5)


def test_geo_seq_mask_hand():
    # one token per row off by r; geometric mean over 3 response tokens = r^(1/3):
    # 1.03 -> 1.0099 kept, 1.04 -> 1.0132 > 1.01 masked, .96 -> .9865 < .99 masked;
    # row 3: padding with r = 9 is not counted (its tokens 0, 1 have r = 1: kept)
    pi = [[0.515, 0.5, 0.5], [0.52, 0.5, 0.5], [0.48, 0.5, 0.5], [0.5, 0.5, 0.9]]
    mu = [[0.5, 0.5, 0.5]] * 3 + [[0.5, 0.5, 0.1]]
    mask = [[1, 1, 1]] * 3 + [[1, 1, 0]]
    adv = [1.0, -1.0, 1.0, 2.0]
    r = np.array(pi) / np.array(mu)
    keep = np.array([[1, 1, 1], [0, 0, 0], [0, 0, 0], [1, 1, 0]])
    np.testing.assert_allclose(grad("geo_seq_mask", pi, mu, adv, mask),
                               -keep * r * np.array(adv)[:, None], rtol=1e-5)
    g = grad("geo_seq_mask", pi, mu, adv, mask, params={"geo_low": 0.9, "geo_high": 1.1})
    np.testing.assert_allclose(g, -np.array(mask) * r * np.array(adv)[:, None], rtol=1e-5)


# -------------------------------------------------- test-only transcriptions of the references

def areal_rejection_sampling_token(prox, old, loss_mask, metric, upper, lower=None):
    """areal-project/AReaL @ cbff54d6, areal/utils/functional/functional.py
    apply_rejection_sampling, level="token", action="mask" (steps 1-5), with
    compute_binary_kl_divergence (eps 1e-8). Returns (updated loss_mask, behave_imp_weight)."""
    log_ratio = prox - old
    log_ratio = np.where(np.isfinite(log_ratio), log_ratio, 0.0)
    if metric == "ratio":
        m = np.exp(log_ratio)
    else:  # "binary_kl"
        def kl(log_p, log_q, eps=1e-8):
            p = np.clip(np.exp(log_p), eps, 1.0 - eps)
            q = np.clip(np.exp(log_q), eps, 1.0 - eps)
            return p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
        m = np.maximum(kl(prox, old), kl(old, prox))
    w = np.exp(log_ratio)
    in_bounds = (m >= lower) & (m <= upper) if lower is not None else m <= upper
    updated = (loss_mask.astype(bool) & in_bounds).astype(loss_mask.dtype)
    return updated, np.where(updated.astype(bool), w, 0.0)


def areal_grad(logp, behave, adv, loss_mask, metric, upper, lower=None):
    """d/d logprobs of AReaL's ppo_actor_loss_fn (token level, eps_clip .2, no dual clip) at
    logprobs = proximal_logprobs = logp (the first minibatch: ratio 1, so the clip is inactive
    and d pg_loss / d logprobs = -A * behave_imp_weight), loss = sum(pg_loss * mask) / count of
    the ORIGINAL loss_mask (functional.py: loss_mask_count is taken before rejection)."""
    count = max(loss_mask.sum(), 1)
    mask, w = areal_rejection_sampling_token(logp, behave, loss_mask, metric, upper, lower)
    return -adv * w * mask / count


def slime_opsm_grad(logp, rollout, adv, loss_mask, eps, eps_high, opsm_delta):
    """THUDM/slime @ 624b824a: utils/ppo_utils.py compute_opsm_mask (per-sample loop) times
    compute_policy_loss (ppo_kl = old - new with old = rollout log-probs, no dual clip), summed
    over tokens; the gradient of torch.maximum(pg1, pg2) written out: -A r where pg1 >= pg2
    (ratio inside the clip range or the unclipped side), 0 where the clamp is active."""
    rows = []
    for lp, lo, a, lm in zip(logp, rollout, adv, loss_mask):
        seq_kl = ((lo - lp) * lm).sum() / max(lm.sum(), 1)
        mask = ((a < 0) & (seq_kl > opsm_delta)).astype(float)
        rows.append(1 - mask)
    opsm_mask = np.stack(rows)
    ratio = np.exp(-(rollout - logp))
    pg1 = -ratio * adv
    pg2 = -np.clip(ratio, 1 - eps, 1 + eps_high) * adv
    g = np.where(pg1 >= pg2, -ratio * adv, 0.0)
    return g * opsm_mask * loss_mask


def trl_off_policy_mask(adv, logp, rollout, mask, threshold):
    """huggingface/trl @ f2cd5771, trl/trainer/grpo_trainer.py GRPOTrainer.get_off_policy_mask."""
    kl_div = rollout - logp
    avg = (kl_div * mask).sum(1, keepdims=True) / np.maximum(mask.sum(1, keepdims=True), 1.0)
    return ((adv[:, None] >= 0) | (avg <= threshold)).astype(mask.dtype)


def skyrl_geo_grad(logp, rollout, adv, loss_mask, low, high, tis_cap):
    """NovaSky-AI/SkyRL @ a9564572, skyrl/backends/skyrl_train/utils/off_policy_correction_utils
    .py compute_sequence_mask ("geometric") and compute_tis_ratio ("token": clamp(max=cap)),
    old_log_probs = logp (first minibatch: the PPO ratio is 1); token-sum of -A * tis * mask."""
    log_r = logp - rollout
    n = np.maximum(loss_mask.sum(-1, keepdims=True), 1.0)
    geo = np.exp(np.clip((log_r * loss_mask).sum(-1, keepdims=True) / n, -20, 20))
    seq = ~(geo > high) & ~(geo < low)
    tis = np.minimum(np.exp(np.clip(log_r, -20, 20)), tis_cap)
    return -adv * tis * (loss_mask * seq)


def _batch(seed, B=6, T=9, scale=0.3):
    rng = np.random.default_rng(seed)
    lmu = np.log(rng.uniform(0.02, 0.98, (B, T))).astype(np.float32)
    lp = np.minimum(lmu + rng.normal(0, scale, (B, T)), -1e-3).astype(np.float32)
    adv = rng.choice([-1.3, -0.4, 0.6, 1.1], size=B).astype(np.float32)
    mask = (np.arange(T)[None] < rng.integers(2, T + 1, (B, 1))).astype(np.float32)
    return lp, lmu, adv, mask


def _ours(method, lp, lmu, adv, mask, agg, **kw):
    f = lambda x: policy_loss(x, jnp.asarray(lmu), jnp.asarray(adv), jnp.asarray(mask),
                              method=method, delta_low=0.2, delta_high=0.28, agg=agg, **kw)[0]
    return np.asarray(jax.grad(f)(jnp.asarray(lp)), np.float64)


def test_icepop_and_kpop_match_areal():
    lp, lmu, adv, mask = _batch(0, scale=0.8)
    f64 = lambda a: np.asarray(a, np.float64)
    a2 = np.broadcast_to(f64(adv)[:, None], lp.shape)
    want = areal_grad(f64(lp), f64(lmu), a2, f64(mask), "ratio", 5.0, 0.5)
    assert 0.05 < np.mean((want == 0) & (mask > 0) & (a2 != 0)) < 0.6  # the band does bite
    np.testing.assert_allclose(_ours("icepop", lp, lmu, adv, mask, "token-mean"), want,
                               rtol=2e-5, atol=1e-7)
    for phi in (2.0, 0.05):
        want = areal_grad(f64(lp), f64(lmu), a2, f64(mask), "binary_kl", phi)
        got = _ours("kpop", lp, lmu, adv, mask, "token-mean", params={"kpop_phi": phi})
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    assert np.mean(want == 0) > 0.2  # phi = .05 masks


def test_opsm_matches_slime_and_trl():
    lp, lmu, adv, mask = _batch(1, scale=0.2)
    f64 = lambda a: np.asarray(a, np.float64)
    for delta in (1e-4, 0.05):
        want = slime_opsm_grad(f64(lp), f64(lmu), f64(adv)[:, None], f64(mask), 0.2, 0.28, delta)
        got = _ours("opsm", lp, lmu, adv, mask, "token-sum", params={"opsm_delta": delta})
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
        keep_trl = trl_off_policy_mask(f64(adv), f64(lp), f64(lmu), f64(mask), delta)
        # rows TRL drops get exactly zero gradient here
        assert np.all(got[np.broadcast_to(keep_trl == 0, got.shape)] == 0)
    assert (trl_off_policy_mask(f64(adv), f64(lp), f64(lmu), f64(mask), 1e-4) == 0).any()


def test_geo_seq_mask_matches_skyrl():
    lp, lmu, adv, mask = _batch(2, scale=0.02)
    f64 = lambda a: np.asarray(a, np.float64)
    want = skyrl_geo_grad(f64(lp), f64(lmu), f64(adv)[:, None], f64(mask), 0.99, 1.01, 2.0)
    got = _ours("geo_seq_mask", lp, lmu, adv, mask, "token-sum", is_cap=2.0)
    assert 0 < np.mean(np.all(want == 0, axis=1)) < 1  # some rows masked, some not
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)


# ------------------------------------------------- aggregation, micro-batches, loss-fused head

@pytest.mark.parametrize("method", NEW)
def test_all_aggregations_finite_and_microbatch_exact(method):
    lp, lmu, adv, mask = _batch(3, B=4, T=6, scale=0.5)
    lp, lmu, adv, mask = map(jnp.asarray, (lp, lmu, adv, mask))
    params = {"kpop_phi": 0.1}
    # m2po: pi_old, and its batch mask computed once over all rows (as the train step does)
    old = lp + 0.2 * jnp.sin(jnp.arange(lp.size, dtype=jnp.float32).reshape(lp.shape))
    blocked = losses.m2po_blocked(old, lmu, mask, 0.04).astype(jnp.float32)
    extra = (lambda s: dict(old_logp=old[s], divergence=blocked[s])) if method == "m2po" else (
        lambda s: {})
    for agg in losses.AGGREGATIONS:
        kw = dict(method=method, delta_low=0.2, delta_high=0.28, agg=agg, params=params)
        (loss, m), g = jax.value_and_grad(
            lambda x: policy_loss(x, lmu, adv, mask, **kw, **extra(slice(None))),
            has_aux=True)(lp)
        assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(g))), agg
        assert all(np.isfinite(float(v)) for v in m.values()), agg
        full = policy_loss_terms(lp, lmu, adv, mask, **kw, **extra(slice(None)))
        parts = [policy_loss_terms(lp[i:i + 2], lmu[i:i + 2], adv[i:i + 2], mask[i:i + 2],
                                   **kw, **extra(slice(i, i + 2))) for i in (0, 2)]
        assert float(sum(p.loss_sum for p in parts)) == pytest.approx(float(full.loss_sum),
                                                                      rel=1e-5, abs=1e-7)
        if agg != "token-sum":  # (token-sum's denominator is 1 per call)
            assert float(sum(p.denom for p in parts)) == pytest.approx(float(full.denom))


@pytest.mark.parametrize("method", ["icepop", "kpop", "drpo"])
def test_logp_grad_is_autodiff(method):
    lp, lmu, adv, mask = _batch(4, scale=0.8)
    params = {"icepop_low": 0.6, "icepop_high": 3.0, "kpop_phi": 0.1, "drpo_eps": 0.3}
    kw = dict(method=method, delta_low=0.2, delta_high=0.28, is_cap=4.0, params=params)
    for agg in ("token-mean", "seq-mean-token-mean"):
        f = lambda x: policy_loss(x, jnp.asarray(lmu), jnp.asarray(adv), jnp.asarray(mask),
                                  agg=agg, **kw)[0]
        want = np.asarray(jax.grad(f)(jnp.asarray(lp)))
        num_w, denom = losses.aggregation_weights(jnp.asarray(mask), agg)
        adv2 = jnp.broadcast_to(jnp.asarray(adv)[:, None], lp.shape)
        got = losses.logp_grad(jnp.asarray(lp).ravel(), jnp.asarray(lmu).ravel(), adv2.ravel(),
                               (num_w / denom).ravel(), **kw)
        assert np.mean(want == 0) > 0.05
        np.testing.assert_allclose(np.asarray(got).reshape(lp.shape), want, rtol=1e-6,
                                   atol=1e-9)


def test_sequence_level_methods_are_not_elementwise():
    assert METHODS["icepop"].elementwise and METHODS["kpop"].elementwise
    for method in ("opsm", "geo_seq_mask", "cppo", "minpro_clip"):
        assert not METHODS[method].elementwise
        with pytest.raises(ValueError, match=method):
            losses.logp_grad(jnp.zeros(3), jnp.zeros(3), jnp.ones(3), jnp.ones(3),
                             method=method, delta_low=0.1, delta_high=0.1)


# ------------------------------------------------------------------------- bad parameters

@pytest.mark.parametrize("method,params,msg", [
    ("icepop", {"icepop_low": 0.0}, r"icepop_low must be in \(0.0, inf\)"),
    ("icepop", {"icepop_low": 2.0, "icepop_high": 1.5}, "icepop_low=2.0 must be < icepop_high"),
    ("kpop", {"kpop_phi": -1.0}, "kpop_phi must be in"),
    ("opsm", {"opsm_delta": math.nan}, "opsm_delta must be a finite number"),
    ("geo_seq_mask", {"geo_high": 0.9}, r"geo_high must be in \[1.0, inf\)"),
    ("icepop", {"icepop_lo": 0.5}, "unknown loss parameter"),
    ("cppo", {"cppo_w_min": 1.5}, r"cppo_w_min must be in \[0.0, 1.0\]"),
    ("cppo", {"cppo_delta": 0.0}, r"cppo_delta must be in \(0.0, inf\)"),
])
def test_bad_params(method, params, msg):
    with pytest.raises(ValueError, match=msg):
        policy_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones(1), jnp.ones((1, 2)),
                    method=method, delta_low=0.2, delta_high=0.2, params=params)


@pytest.mark.parametrize("method,field,value", [
    ("icepop", "icepop_high", 0.4),  # < icepop_low 0.5
    ("kpop", "kpop_phi", 0.0),
    ("opsm", "opsm_delta", -1e-3),
    ("geo_seq_mask", "geo_low", 1.5),
    ("cppo", "cppo_delta_b", -0.01),
])
def test_bad_config_values_name_the_field(method, field, value):
    from configs import default
    from trustrl.training import config_validation
    cfg = default.get_config()
    cfg.loss.method = method
    config_validation.validate(cfg)  # the defaults are valid
    cfg.loss[field] = value
    with pytest.raises(ValueError, match=f"loss.{field}"):
        config_validation.validate(cfg)
    cfg.loss.method = "dppo_binary_tv"  # another method does not read it
    config_validation.validate(cfg)


# ------------------------------------------------------------------------------------ DRPO

def unirl_drpo_loss(new_logp, old_logp, advantages, epsilon=12.5):
    """Tencent-Hunyuan/UniRL @ 1a7b501e, unirl/algorithms/drpo.py _drpo_loss (mu_weighted=True),
    in NumPy float64: the per-token loss and its derivative w.r.t. new_logp (torch autograd
    written out: clamp passes the gradient inside [-20, 20])."""
    log_diff = np.clip(new_logp - old_logp, -20.0, 20.0)
    ratio = np.exp(log_diff)
    adv = advantages
    old_prob = np.exp(old_logp)
    quadratic_penalty = np.abs(adv) * old_prob * (ratio - 1.0) ** 2 / (2.0 * epsilon)
    pg_losses = -adv * ratio + quadratic_penalty
    inside = (new_logp - old_logp >= -20.0) & (new_logp - old_logp <= 20.0)
    d = (-adv * ratio + np.abs(adv) * old_prob * (ratio - 1.0) * ratio / epsilon) * inside
    return pg_losses, d


def test_drpo_hand():
    # (pi, mu, A): r = 1.5, pi - mu = .1 (diverging, A > 0): weight 1 - .1 / eps;
    # r = .5, pi - mu = -.2, A > 0 (converging): 1 + .2 / eps; A < 0, r = 2, pi - mu = .3
    # (converging for A < 0): 1 + .3 / eps; r = 1: no penalty
    pi, mu, adv = [[0.3, 0.2, 0.6, 0.5]], [[0.2, 0.4, 0.3, 0.5]], [[1.0, 2.0, -1.0, -1.5]]
    r = np.array(pi) / np.array(mu)
    for eps in (12.5, 0.25):
        w = 1 - np.sign(np.array(adv) * (r - 1)) * np.abs(np.array(pi) - np.array(mu)) / eps
        g = grad("drpo", pi, mu, adv, params={"drpo_eps": eps})
        np.testing.assert_allclose(g, -r * np.array(adv) * w, rtol=1e-5)
    # eps = .25: the diverging token's weight 1 - .1 / .25 = .6; at |pi - mu| > eps it turns
    # corrective (negative): pi = .5, mu = .2, A = 1 -> weight 1 - .3 / .25 = -.2
    g = grad("drpo", [[0.5]], [[0.2]], [[1.0]], params={"drpo_eps": 0.25})
    np.testing.assert_allclose(g, [[-2.5 * -0.2]], rtol=1e-5)
    # value: -A r + |A| mu (r - 1)^2 / (2 eps), token-sum
    loss, m = policy_loss(jnp.log(jnp.array(pi)), jnp.log(jnp.array(mu)), jnp.array(adv),
                          jnp.ones((1, 4)), method="drpo", delta_low=.2, delta_high=.2,
                          agg="token-sum")
    want = np.sum(-np.array(adv) * r + np.abs(adv) * np.array(mu) * (r - 1) ** 2 / 25.0)
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(m["loss/masked_frac"]) == 0.0


def test_drpo_matches_unirl():
    lp, lmu, adv, mask = _batch(5, scale=0.8)
    f64 = lambda a: np.asarray(a, np.float64)
    a2 = np.broadcast_to(f64(adv)[:, None], lp.shape)
    for eps in (12.5, 0.1):
        l_ref, g_ref = unirl_drpo_loss(f64(lp), f64(lmu), a2, eps)
        # the reference's token-mean: loss_per_elem * loss_mask, then .mean() over the packed
        # response tokens = sum over the mask / count
        n = mask.sum()
        kw = dict(method="drpo", delta_low=0.2, delta_high=0.28, agg="token-mean",
                  params={"drpo_eps": eps})
        loss, _ = policy_loss(jnp.asarray(lp), jnp.asarray(lmu), jnp.asarray(adv),
                              jnp.asarray(mask), **kw)
        assert float(loss) == pytest.approx(float((l_ref * mask).sum() / n), rel=2e-5)
        np.testing.assert_allclose(_ours("drpo", lp, lmu, adv, mask, "token-mean",
                                         params={"drpo_eps": eps}),
                                   g_ref * mask / n, rtol=2e-5, atol=1e-7)
        # the reference's seq-mean-token-sum-norm with horizon = T
        loss, _ = policy_loss(jnp.asarray(lp), jnp.asarray(lmu), jnp.asarray(adv),
                              jnp.asarray(mask), **{**kw, "agg": "seq-mean-token-sum-norm"})
        want = np.mean((l_ref * mask).sum(-1)) / lp.shape[1]
        assert float(loss) == pytest.approx(float(want), rel=2e-5)
    # eps = .1 makes some weights corrective: the gradient has the opposite sign of -A r
    assert np.any((np.sign(g_ref) == np.sign(a2)) & (a2 != 0) & (mask > 0))


# ------------------------------------------------------------------------------------ M2PO

def areal_m2po_mask(old_logp, prox_logp, loss_mask, m2_threshold):
    """areal-project/AReaL @ cbff54d6, areal/trainer/ppo/actor.py _apply_m2po_masking and
    _get_m2po_loss_mask in NumPy (float64; a stable descending sort). Returns the kept mask."""
    delta = old_logp - prox_logp
    m2 = delta * delta
    mask_flat = loss_mask.reshape(-1).astype(bool)
    m2_selected = m2.reshape(-1)[mask_flat]
    if m2_selected.size == 0:
        return loss_mask.astype(bool)
    indices = np.argsort(-m2_selected, kind="stable")
    sorted_m2 = m2_selected[indices]
    restored_indices = np.argsort(indices, kind="stable")
    n = sorted_m2.size
    suffix_sums = np.cumsum(sorted_m2[::-1])[::-1]
    counts = np.arange(n, 0, -1, dtype=np.float64)
    below = np.where(suffix_sums / counts < m2_threshold)[0]
    num_to_mask = below[0] if len(below) > 0 else n - 1
    keep_sorted = np.ones(n, bool)
    keep_sorted[:num_to_mask] = False
    full = np.zeros_like(mask_flat)
    full[mask_flat] = keep_sorted[restored_indices]
    return full.reshape(loss_mask.shape)


def test_m2po_hand():
    # m2 = (log mu - log pi_old)^2 = .25, .01, .04, 0 (+ padding .81 not counted); threshold .04:
    # suffix means .075 (>= .04), .05/3 = .0167 < .04 -> block the one largest (.25)
    old = np.zeros((1, 5), np.float32) - 1.0
    mu = old - np.array([[0.5, 0.1, 0.2, 0.0, 0.9]], np.float32)
    mask = np.array([[1, 1, 1, 1, 0]], np.float32)
    got = losses.m2po_blocked(jnp.asarray(old), jnp.asarray(mu), jnp.asarray(mask), 0.04)
    assert np.asarray(got).tolist() == [[True, False, False, False, False]]
    # threshold .01: .0167 >= .01, then (.01 + 0) / 2 = .005 < .01: block the two largest
    got = losses.m2po_blocked(jnp.asarray(old), jnp.asarray(mu), jnp.asarray(mask), 0.01)
    assert np.asarray(got).tolist() == [[True, False, True, False, False]]
    # threshold 1e-4: only the last suffix (m2 = 0) is below it: the three largest blocked
    got = losses.m2po_blocked(jnp.asarray(old), jnp.asarray(mu), jnp.asarray(mask), 1e-4)
    assert np.asarray(got).tolist() == [[True, True, True, False, False]]
    # no suffix is below the threshold: one token stays, the LAST of the smallest tie (m2 .01
    # at 1 and 2; the stable descending sort puts 1 before 2, so 1 is blocked)
    mu2 = old - np.array([[0.5, 0.1, 0.1, 0.5, 0.9]], np.float32)
    got = losses.m2po_blocked(jnp.asarray(old), jnp.asarray(mu2), jnp.asarray(mask), 1e-3)
    assert np.asarray(got).tolist() == [[True, True, False, True, False]]
    # gradient: pi = pi_old (the PPO clip on pi / pi_old inactive), weight pi / mu, A = 1
    lp = jnp.asarray(old)
    g = jax.grad(lambda x: policy_loss(x, jnp.asarray(mu), jnp.ones(1), jnp.asarray(mask),
                                       method="m2po", delta_low=.2, delta_high=.2,
                                       agg="token-sum", old_logp=lp)[0])(lp)
    r = np.exp(old - mu)
    np.testing.assert_allclose(np.asarray(g), -r * [[0, 1, 1, 1, 0]], rtol=1e-6)


@pytest.mark.parametrize("ties", [False, True])
def test_m2po_sort_free_cut_matches_the_stable_sort(ties):
    """m2po_blocked finds the cut by bisection, not a sort: against the float64 transcription of
    AReaL's stable sort on batches with and without ties (m2 on a 1/64 grid: many equal
    values, the cut inside a tie; dyadic, so float32 keeps them equal), padding, an
    all-padding batch and thresholds that block none / all but one token."""
    rng = np.random.default_rng(11 + ties)
    f64 = lambda a: np.asarray(a, np.float64)
    seen_tie_cut = 0
    for trial in range(12):
        shape = (8, 64)  # the rows' lengths vary through the mask
        old = rng.normal(-1, 1, shape)
        step = rng.normal(0, [0.05, 0.3, 1.0][trial % 3], shape)
        if ties:  # dyadic grids: f32 differences and squares are exact, ties survive
            old, step = np.round(old * 8) / 8, np.round(step * 8) / 8
        old, mu = old.astype(np.float32), (old + step).astype(np.float32)
        mask = (rng.random(shape) < rng.uniform(0.05, 1.0)).astype(np.float32)
        mask *= np.arange(64) < rng.integers(1, 65, (8, 1))
        if trial == 0:
            mask[:] = 0
        for thr in (0.04, 0.013, 1e-6, 50.0):
            keep = areal_m2po_mask(f64(mu), f64(old), f64(mask), thr)
            blocked = np.asarray(losses.m2po_blocked(old, mu, mask, thr))
            np.testing.assert_array_equal(~blocked & (mask > 0), keep, err_msg=f"{trial} {thr}")
            assert not (blocked & (mask == 0)).any()
            m2 = np.square(f64(mu) - f64(old))[mask > 0]
            if blocked.sum() and keep.sum():
                cut = m2[np.asarray(blocked)[mask > 0]].min()
                seen_tie_cut += bool((m2[keep[mask > 0]] == cut).any())
    assert seen_tie_cut > 0 if ties else seen_tie_cut == 0  # the tie branch ran (or could not)


def test_m2po_matches_areal_and_is_exact_over_microbatches():
    lp, lmu, adv, mask = _batch(6, scale=0.3)
    rng = np.random.default_rng(7)
    old = (lp + rng.normal(0, 0.05, lp.shape)).astype(np.float32)  # pi_old near pi
    f64 = lambda a: np.asarray(a, np.float64)
    for thr in (0.04, 0.02):
        keep = areal_m2po_mask(f64(lmu), f64(old), f64(mask), thr)
        got = ~np.asarray(losses.m2po_blocked(old, lmu, mask, thr)) & (mask > 0)
        np.testing.assert_array_equal(got, keep)
        assert 0 < (~keep & (mask > 0)).sum() < mask.sum()
    blocked = losses.m2po_blocked(old, lmu, mask, 0.04).astype(jnp.float32)
    kw = dict(method="m2po", delta_low=0.2, delta_high=0.28, agg="token-mean")
    args = lambda s: (jnp.asarray(lp[s]), jnp.asarray(lmu[s]), jnp.asarray(adv[s]),
                      jnp.asarray(mask[s]))
    full = policy_loss_terms(*args(slice(None)), old_logp=jnp.asarray(old), **kw)
    # the train step's micro-batches: strided rows, the minibatch's mask handed to each
    parts = [policy_loss_terms(*args(slice(i, None, 2)), old_logp=jnp.asarray(old[i::2]),
                               divergence=blocked[i::2], **kw) for i in (0, 1)]
    assert float(sum(p.loss_sum for p in parts)) == pytest.approx(float(full.loss_sum),
                                                                  rel=1e-6, abs=1e-8)
    # (the per-micro-batch statistic would differ: the reason the step computes it once)
    local = [policy_loss_terms(*args(slice(i, None, 2)), old_logp=jnp.asarray(old[i::2]), **kw)
             for i in (0, 1)]
    assert abs(float(sum(p.loss_sum for p in local)) - float(full.loss_sum)) > 1e-4
    # the gradient and logp_grad (elementwise, given the batch mask)
    f = lambda x: policy_loss(x, jnp.asarray(lmu), jnp.asarray(adv), jnp.asarray(mask),
                              old_logp=jnp.asarray(old), **kw)[0]
    want = np.asarray(jax.grad(f)(jnp.asarray(lp)))
    num_w, denom = losses.aggregation_weights(jnp.asarray(mask), "token-mean")
    adv2 = jnp.broadcast_to(jnp.asarray(adv)[:, None], lp.shape)
    got = losses.logp_grad(jnp.asarray(lp), jnp.asarray(lmu), adv2, num_w / denom,
                           old_logp=jnp.asarray(old), divergence=blocked,
                           **{k: v for k, v in kw.items() if k != "agg"})
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-9)
    r, r_old = np.exp(f64(lp) - f64(lmu)), np.exp(f64(lp) - f64(old))
    a2 = np.broadcast_to(f64(adv)[:, None], lp.shape)
    clip = ((a2 > 0) & (r_old > 1.28)) | ((a2 < 0) & (r_old < 0.8))
    ref = -a2 * r * areal_m2po_mask(f64(lmu), f64(old), f64(mask), 0.04) * ~clip / mask.sum()
    np.testing.assert_allclose(want, ref, rtol=2e-5, atol=1e-7)


@pytest.mark.slow
def test_m2po_accumulated_train_step_equals_one_pass():
    """train.microbatches = 4 gives the one-pass update: the batch mask is computed once over
    the minibatch before the split (a per-micro-batch statistic would not)."""
    import functools
    from configs import default
    from trustrl.model.transformer import ModelConfig, init_params
    from trustrl.training import optim, step as ts
    B, P, N, V = 8, 3, 5, 32
    rng = np.random.default_rng(0)
    toks = jnp.asarray(rng.integers(1, V, (B, P + N)), jnp.int32)
    valid = jnp.ones((B, P + N), jnp.int32)
    mask = (np.arange(N)[None] < np.array([5, 1, 3, 0, 2, 5, 4, 1])[:, None]).astype(np.float32)
    lmu = rng.uniform(-4.0, -0.5, (B, N)).astype(np.float32)
    batch = dict(tokens=toks, valid=valid, positions=jnp.cumsum(valid, 1) - 1,
                 response_tokens=toks[:, P:], response_mask=jnp.asarray(mask),
                 rollout_logp=jnp.asarray(lmu),
                 old_logp=jnp.asarray(lmu + rng.normal(0, 0.3, (B, N)).astype(np.float32)),
                 advantages=jnp.asarray(rng.normal(size=B), jnp.float32))
    frac = float(losses.m2po_blocked(batch["old_logp"], batch["rollout_logp"], mask, 0.04)
                 .sum() / mask.sum())
    assert 0 < frac < 1
    mcfg = ModelConfig.tiny(vocab_size=V)
    params = init_params(mcfg, jax.random.key(0))
    cfg = default.get_config("tiny")
    cfg.loss.method, cfg.loss.agg = "m2po", "token-mean"
    cfg.optim.grad_clip = 0.0
    tx = optim.make_optimizer(cfg.optim, 10)
    state = ts.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), skipped=jnp.zeros((), jnp.int32))
    run = lambda n: jax.jit(functools.partial(
        ts.train_step, model_cfg=mcfg, loss_cfg=cfg.loss, tx=tx, rollout_model_cfg=mcfg,
        microbatches=n))(state, batch, params)
    (one, m1), (acc, m4) = run(1), run(4)
    assert float(m1["train/grad_norm"]) > 0
    np.testing.assert_allclose(float(m4["loss/value"]), float(m1["loss/value"]), rtol=1e-5,
                               atol=1e-7)
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(one.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------ CPPO

def unirl_cppo_keep(new_logp, old_logp, advantages, lengths, delta, w_min, delta_b):
    """Tencent-Hunyuan/UniRL @ 30899fcf, unirl/algorithms/cppo.py ``_cppo_mask`` transcribed
    to NumPy float64 (test-only): packed responses (one flat array, ``lengths`` per response),
    a loop per response; np.quantile's default (linear) is torch.quantile's."""
    prob, old_prob = np.exp(new_logp), np.exp(old_logp)
    d_all = np.abs(prob - old_prob)
    ratio = np.exp(np.clip(new_logp - old_logp, -20.0, 20.0))
    toward_mu = (advantages * (ratio - 1.0)) <= 0.0
    keep, start = [], 0
    for n in lengths:
        d_t, toward_t = d_all[start:start + n], toward_mu[start:start + n]
        start += n
        if n == 0:
            continue
        pos = np.arange(1, n + 1, dtype=np.float64)
        w_t = 1.0 - (1.0 - w_min) * (pos - 1) / max(n - 1, 1)
        z_t = w_t * d_t
        s_prev = np.concatenate([[0.0], np.cumsum(z_t)[:-1]])
        w_prev = np.concatenate([[0.0], np.cumsum(w_t)[:-1]])
        delta_b_seq = np.clip(np.quantile(d_t, 0.9), delta_b, 2.0 * delta_b)
        c_t = np.minimum(np.full_like(z_t, delta), delta + delta_b_seq * w_prev - s_prev)
        keep.append(toward_t | (z_t <= c_t))
    return np.concatenate(keep)


def unirl_cppo_grad(lp, lmu, adv, mask, delta, w_min, delta_b):
    """The reference loss -A r keep (keep detached) per token: d/d logp = -A r keep on the
    packed tokens, unpacked to [B, T] (the rows' response tokens are their first mask > 0)."""
    lengths = mask.sum(1).astype(int)
    sel = mask > 0
    a2 = np.broadcast_to(adv[:, None], lp.shape)
    keep = unirl_cppo_keep(lp[sel], lmu[sel], a2[sel], lengths, delta, w_min, delta_b)
    r = np.exp(np.clip(lp[sel] - lmu[sel], -20, 20))
    out = np.zeros(lp.shape)
    out[sel] = -a2[sel] * r * keep
    return out, keep


def test_cppo_hand():
    """One row of 3 tokens, A = +1, every pi > mu (moving away), delta 0.15, w_min 0.8,
    delta_b 0.02: D = .1, .1, .12; w = 1, .9, .8; Z = .1, .09, .096; the 0.9-quantile of D
    = .1 + .8 (.12 - .1) = .116 -> db = clip(.116, .02, .04) = .04; W_prev = 0, 1, 1.9;
    S_prev = 0, .1, .19; c = min(.15, .15 + .04 W_prev - S_prev) = .15, .09, .036. Kept: t1
    (.1 <= .15), t2 (.09 <= .09, a tie), not t3 (.096 > .036). With A = -1 every token moves
    back towards mu (A (r - 1) < 0) and all are kept."""
    mu = np.array([[0.3, 0.4, 0.5]])
    pi = mu + np.array([[0.1, 0.1, 0.12]])
    r = pi / mu
    g = grad("cppo", pi, mu, [[1.0, 1.0, 1.0]])
    np.testing.assert_allclose(g, -np.array([[1, 1, 0]]) * r, rtol=1e-5)
    np.testing.assert_allclose(grad("cppo", pi, mu, [[-1.0, -1.0, -1.0]]), r, rtol=1e-5)
    # a second row after it does not change the first (the sums reset per row), padding neither
    pi2 = np.array([[0.4, 0.5, 0.62, 0.5], [0.9, 0.9, 0.9, 0.5]])
    mu2 = np.array([[0.3, 0.4, 0.5, 0.5], [0.1, 0.1, 0.1, 0.5]])
    mask2 = np.array([[1, 1, 1, 0], [1, 1, 1, 0]])
    g2 = grad("cppo", pi2, mu2, [[1.0] * 4, [1.0] * 4], mask=mask2)
    np.testing.assert_allclose(g2[0, :3], -np.array([1, 1, 0]) * r[0], rtol=1e-5)
    assert g2[0, 3] == 0 and g2[1, 3] == 0
    # row 2: D = .8 each > delta / w: only the first token (c_1 = delta = .15 < .8): none kept
    assert np.all(g2[1] == 0)


def test_cppo_matches_unirl():
    for seed, scale in ((5, 0.3), (6, 0.8), (7, 0.05)):
        lp, lmu, adv, mask = _batch(seed, B=8, T=12, scale=scale)
        f64 = lambda a: np.asarray(a, np.float64)
        for delta, w_min, db in ((0.15, 0.8, 0.02), (0.05, 0.5, 0.01)):
            want, keep = unirl_cppo_grad(f64(lp), f64(lmu), f64(adv), f64(mask), delta, w_min, db)
            got = _ours("cppo", lp, lmu, adv, mask, "token-sum",
                        params={"cppo_delta": delta, "cppo_w_min": w_min, "cppo_delta_b": db})
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
            if scale == 0.3:  # the mask bites and keeps
                assert 0.05 < np.mean(~keep) < 0.95, np.mean(~keep)


@pytest.mark.parametrize("shape", [(3, 1), (2, 31), (4, 32), (2, 33), (5, 1000), (2, 3, 77)])
def test_cppo_prefix_sum_in_blocks(shape):
    """cppo's prefix sums (a triangular matmul per block of 32, then the blocks' totals): equal
    to a float64 cumsum, and bit-exact on 0 / 1 counts, at lengths that are not multiples of
    the block and with leading axes."""
    rng = np.random.default_rng(len(shape) * 100 + shape[-1])
    v = rng.random(shape).astype(np.float32)
    np.testing.assert_allclose(np.asarray(losses._prefix_sum(jnp.asarray(v))),
                               np.cumsum(v.astype(np.float64), -1), rtol=1e-5)
    m = (rng.random(shape) < 0.5).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(losses._prefix_sum(jnp.asarray(m))),
                                  np.cumsum(m, -1))


def test_cppo_row_quantile_is_numpys_linear():
    rng = np.random.default_rng(0)
    v = rng.uniform(size=(5, 7)).astype(np.float32)
    mask = (np.arange(7)[None] < np.array([[7], [1], [2], [5], [0]])).astype(np.float32)
    got = np.asarray(losses._row_quantile(jnp.asarray(v), jnp.asarray(mask), 0.9))[:, 0]
    for b in range(4):
        n = int(mask[b].sum())
        assert got[b] == pytest.approx(np.quantile(v[b, :n].astype(np.float64), 0.9), rel=1e-6)
    assert got[4] == 0.0


def test_cppo_clipped_quantile_takes_the_fast_path_only_where_the_clip_decides():
    """The clipped 0.9-quantile equals clip(np.quantile) on rows below, inside, straddling and
    above [low, high], with and without a row that needs the sort (both branches)."""
    rng = np.random.default_rng(1)
    low, high = 0.02, 0.04
    rows = [rng.uniform(0, 0.01, 9), rng.uniform(0.05, 0.2, 9), rng.uniform(0.021, 0.039, 9),
            np.r_[rng.uniform(0, 0.01, 7), 0.03, 0.05], np.r_[np.zeros(8), 0.5],
            np.r_[rng.uniform(0, 0.01, 4), np.full(5, 0.07)]]
    v = np.stack(rows).astype(np.float32)
    lengths = np.array([9, 9, 9, 9, 9, 3])
    mask = (np.arange(9)[None] < lengths[:, None]).astype(np.float32)
    for sel in (slice(None), [0, 1, 4, 5]):  # all rows (the sort runs) / only decided rows
        got = np.asarray(losses._clipped_row_quantile(jnp.asarray(v[sel]),
                                                      jnp.asarray(mask[sel]), 0.9, low, high))
        for i, b in enumerate(np.arange(len(rows))[sel]):
            n = lengths[b]
            want = np.clip(np.quantile(v[b, :n].astype(np.float64), 0.9), low, high)
            assert got[i, 0] == pytest.approx(want, rel=1e-6), (b, got[i, 0], want)
    empty = losses._clipped_row_quantile(jnp.zeros((1, 4)), jnp.zeros((1, 4)), 0.9, low, high)
    assert float(empty[0, 0]) == pytest.approx(low)


# ------------------------------------------------------------------------------- minpro_clip

def miles_minpro_grad(logp, rollout, adv, loss_mask, eps, eps_high):
    """Yifei-Zuo/miles @ 8d16871a, miles/backends/training_utils/loss_hub/math_utils.py
    compute_minpro_prefix_min (per sample: ratios with mask-0 tokens +inf, cummin, shifted one
    right with +inf, inf -> 1) and compute_minpro_loss (combined = prefix_min * ratio, the
    torch.maximum of -combined A and -clamp(combined, 1 - eps, 1 + eps_high) A), old = the
    rollout log-probs (--use-rollout-logprobs), summed over tokens times the loss mask: the
    gradient written out, -A rho_bar r where pg1 >= pg2, 0 where the clamp is active."""
    out = []
    for lp, lo, a, lm in zip(logp, rollout, adv, loss_mask):
        ratio = np.exp(np.clip(lp - lo, -20, 20))
        masked = np.where(lm > 0, ratio, np.inf)
        inclusive = np.minimum.accumulate(masked)
        exclusive = np.concatenate([[np.inf], inclusive[:-1]])
        prefix = np.where(np.isinf(exclusive), 1.0, exclusive)
        combined = prefix * ratio
        pg1 = -combined * a
        pg2 = -np.clip(combined, 1 - eps, 1 + eps_high) * a
        out.append(np.where(pg1 >= pg2, -a * combined, 0.0) * lm)
    return np.stack(out)


def test_minpro_clip_hand():
    # one row: pi / mu = 0.5, 2, 0.9, 1 on tokens 1..4, token 2 masked (a prompt / observation
    # token): rho_bar = 1, 0.5, 0.5, 0.5 (token 2 transparent, the first has no prefix)
    pi, mu = [[0.25, 0.4, 0.45, 0.3]], [[0.5, 0.2, 0.5, 0.3]]
    mask = [[1.0, 0.0, 1.0, 1.0]]
    lp, lmu = jnp.log(jnp.asarray(pi)), jnp.log(jnp.asarray(mu))
    x = losses._Inputs(lp, lmu, jnp.ones((1, 4)), jnp.asarray(mask), losses._ratio(lp, lmu),
                       None, None, 0.2, 0.28, None, {})
    np.testing.assert_allclose(losses._minpro_prefix(x), [[1.0, 0.5, 0.5, 0.5]], rtol=1e-6)
    # A > 0: c = 0.5, 1.0, 0.45, 0.5 (c on the masked token is never used): nothing above
    # 1.28, so every response token keeps the gradient -A c
    g = grad("minpro_clip", pi, mu, [[1.0] * 4], mask=mask)
    np.testing.assert_allclose(g, [[-0.5, 0.0, -0.45, -0.5]], rtol=1e-5)
    # A < 0: c < 0.8 is clipped, so tokens 1, 3 and 4 are blocked
    g = grad("minpro_clip", pi, mu, [[-1.0] * 4], mask=mask)
    np.testing.assert_array_equal(g, np.zeros((1, 4)))
    # r = 1.8 then 1: c = 1.8 (no prefix) and 1.8 * 1 (the prefix minimum 1.8), both > 1.28
    g1 = grad("minpro_clip", [[0.9, 0.2]], [[0.5, 0.2]], [[1.0, 1.0]])
    np.testing.assert_array_equal(g1, np.zeros((1, 2)))
    # r = 0.5 then 2: c = 0.5 and 0.5 * 2 = 1, both kept (ppo_clip blocks r = 2 > 1.28)
    g2 = grad("minpro_clip", [[0.25, 0.4]], [[0.5, 0.2]], [[1.0, 1.0]])
    np.testing.assert_allclose(g2, [[-0.5, -1.0]], rtol=1e-5)
    np.testing.assert_allclose(grad("ppo_clip", [[0.25, 0.4]], [[0.5, 0.2]], [[1.0, 1.0]]),
                               [[-0.5, 0.0]], rtol=1e-5)
    # rho_bar = 1 everywhere (ratios >= 1 before each token) -> ppo_clip's gradient
    pi2, mu2 = [[0.3, 0.5, 0.2]], [[0.3, 0.4, 0.2]]
    for a in (1.0, -1.0):
        np.testing.assert_allclose(grad("minpro_clip", pi2, mu2, [[a] * 3]),
                                   grad("ppo_clip", pi2, mu2, [[a] * 3]), rtol=1e-6)


def test_minpro_clip_matches_miles():
    f64 = lambda a: np.asarray(a, np.float64)
    for seed, scale in ((5, 0.3), (6, 0.8)):
        lp, lmu, adv, mask = _batch(seed, scale=scale)
        mask = mask * (np.arange(lp.shape[1]) % 4 != 1)  # mask-0 tokens inside the rows too
        want = miles_minpro_grad(f64(lp), f64(lmu), f64(adv)[:, None], f64(mask), 0.2, 0.28)
        got = _ours("minpro_clip", lp, lmu, adv, mask, "token-sum")
        live = (mask > 0) & (np.broadcast_to(adv[:, None], mask.shape) != 0)
        assert 0.05 < np.mean(want[live] == 0) < 0.95  # the clip does bite, not everywhere
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
