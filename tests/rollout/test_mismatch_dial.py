"""The mismatch dial's sampler-side sources (logit noise, the two engine traps), the parameter
history behind staleness, and the rescoring of ``rollout.mu="rescored"``
(trustrl.rollout.mismatch, trustrl.rollout.sampler.next_token,
trustrl.training.rollout_source)."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustrl.rollout import mismatch
from trustrl.rollout.sampler import SamplerConfig, filter_logits, next_token
from trustrl.training.rollout_source import RolloutSource


def _logits(b=6, v=50, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, v)) * 2.0, jnp.float32)


def test_noise_is_the_recorded_distribution_and_a_separate_key():
    logits, key, s = _logits(), jax.random.key(3), 0.3
    cfg = SamplerConfig(temperature=0.7, logit_noise=s)
    tok, lp, full = next_token(logits, key, cfg)
    # by hand: the noise from its own split of the key, the draw from the rest
    k_draw, k_noise = jax.random.split(key)
    noised = logits + s * jax.random.normal(k_noise, logits.shape, jnp.float32)
    want_full = jax.nn.log_softmax(noised / 0.7, axis=-1)
    np.testing.assert_array_equal(full, want_full)
    np.testing.assert_array_equal(tok, jax.random.categorical(k_draw, want_full, axis=-1))
    np.testing.assert_array_equal(lp, jnp.take_along_axis(want_full, tok[:, None], -1)[:, 0])
    # noise 0 (the default) is the clean sampler, bitwise (no extra key split)
    tok0, lp0, full0 = next_token(logits, key, SamplerConfig(temperature=0.7))
    np.testing.assert_array_equal(full0, jax.nn.log_softmax(logits / 0.7, axis=-1))
    np.testing.assert_array_equal(tok0, jax.random.categorical(key, full0, axis=-1))


def test_noise_scale_gives_the_predicted_mismatch():
    """log mu_y - log pi_y = e_y - sum_j pi_j e_j + O(s^2) for e ~ N(0, s^2 I) on the logits
    (T = 1): a normal with variance s^2 (1 - 2 pi_y + sum_j pi_j^2), so E|log mu_y - log pi_y|
    = s sqrt(2 / pi) sqrt(that). Over 4,000 draws the measured mean is within 5% of it, for
    each of three scales (the dial's noise is the scale it says)."""
    logits = _logits(b=1, v=40, seed=1)[0]
    pi = jax.nn.softmax(logits)
    y = 7  # a fixed token: the ratio at one vocabulary entry
    for s in (0.01, 0.03, 0.1):
        keys = jax.random.split(jax.random.key(0), 4000)
        cfg = SamplerConfig(logit_noise=s)
        full = jax.vmap(lambda k: next_token(logits[None], k, cfg)[2][0])(keys)
        got = float(jnp.mean(jnp.abs(full[:, y] - jnp.log(pi[y]))))
        want = s * math.sqrt(2 / math.pi) * math.sqrt(1 - 2 * pi[y] + jnp.sum(pi ** 2))
        assert abs(got / want - 1) < 0.05, (s, got, want)


def test_pre_temperature_trap_records_the_untempered_log_probs_only():
    logits, key = _logits(), jax.random.key(5)
    clean = next_token(logits, key, SamplerConfig(temperature=0.6))
    trap = next_token(logits, key, SamplerConfig(temperature=0.6, record_pre_temperature=True))
    np.testing.assert_array_equal(trap[0], clean[0])  # sampling unchanged
    want = jax.nn.log_softmax(logits, axis=-1)
    np.testing.assert_array_equal(trap[2], want)
    np.testing.assert_array_equal(trap[1], jnp.take_along_axis(want, trap[0][:, None], -1)[:, 0])
    assert float(jnp.max(jnp.abs(trap[1] - clean[1]))) > 0.05  # and it is a real corruption


def test_top_p_renorm_trap_records_the_truncated_distribution():
    logits, key = _logits(), jax.random.key(6)
    base = SamplerConfig(temperature=0.9, top_p=0.7, record_topk=0)
    clean = next_token(logits, key, base)
    trap = next_token(logits, key, dataclasses.replace(base, record_renormalized=True))
    np.testing.assert_array_equal(trap[0], clean[0])
    full = jax.nn.log_softmax(logits / 0.9, axis=-1)
    kept = filter_logits(full, 0.7, 0) > -jnp.inf
    # by hand: p / (sum of p over the nucleus) inside it, 0 outside
    p = jnp.exp(full)
    want = jnp.where(kept, p / jnp.sum(jnp.where(kept, p, 0), -1, keepdims=True), 0.0)
    np.testing.assert_allclose(jnp.exp(trap[2]), want, rtol=2e-6, atol=0)
    assert bool(jnp.all(kept[jnp.arange(6), trap[0]]))  # the sampled token is in the nucleus
    np.testing.assert_allclose(trap[1], clean[1] - jnp.log(jnp.sum(jnp.where(kept, p, 0), -1)),
                               rtol=1e-6)
    assert bool(jnp.all(trap[1] > clean[1]))  # renormalising raises every kept log-prob


@pytest.mark.parametrize("kwargs,needle", [
    (dict(logit_noise=-0.1), "logit_noise must be a finite number >= 0"),
    (dict(logit_noise=float("nan")), "logit_noise must be a finite number >= 0"),
    (dict(record_renormalized=True), "record_renormalized needs a truncated sampling"),
    (dict(record_renormalized=True, top_p=0.9, record_topk=4), "record_topk=0"),
    (dict(record_pre_temperature=1), "record_pre_temperature must be a bool"),
])
def test_sampler_config_refuses_bad_dial_values(kwargs, needle):
    with pytest.raises((ValueError, TypeError), match=needle):
        SamplerConfig(**kwargs)


def test_param_history_keeps_exactly_the_old_parameters():
    h = mismatch.ParamHistory(3)
    trees = [{"w": jnp.full((4,), float(i)), "b": jnp.arange(3) * i} for i in range(6)]
    for i, t in enumerate(trees):
        h.push(10 + i, t)
    assert len(h) == 3
    for k in range(3):
        params, step = h.at(k)
        assert step == 15 - k and params is trees[5 - k]  # the stored arrays themselves
    assert h.oldest()[1] == 13 and h.newest()[1] == 15
    with pytest.raises(ValueError, match=r"staleness 3 is larger than the stored history: it "
                                         r"holds the last 3 optimizer steps' parameters; valid: "
                                         r"0 \.\. 2"):
        h.at(3)
    with pytest.raises(ValueError, match="staleness must be an int >= 0, got -1"):
        h.at(-1)
    with pytest.raises(ValueError, match="step 15 after step 15; the steps must increase"):
        h.push(15, trees[0])
    fresh = mismatch.ParamHistory(4)
    fresh.push(0, trees[0])
    with pytest.raises(ValueError, match=r"only 1 steps are stored so far; valid now: 0 \.\. 0"):
        fresh.at(2)
    with pytest.raises(ValueError, match="capacity must be an int >= 1"):
        mismatch.ParamHistory(0)


@dataclasses.dataclass
class _State:
    params: dict
    step: int


class _Run:
    """What RolloutSource reads of a Run: the rollout-params cast, the score pass."""
    rollout_params = staticmethod(jax.jit(lambda p: jax.tree.map(lambda x: x * 1.0, p)))

    @staticmethod
    def policy_params(p):
        return p

    @staticmethod
    def score(params, batch):
        return jnp.broadcast_to(params["w"][0], batch["response_mask"].shape) + 0.5


def _cfg(staleness=0, mu="sampler"):
    from configs import default
    c = default.get_config("tiny")
    c.rollout.mismatch.staleness, c.rollout.mu = staleness, mu
    return c


def test_rollout_source_rolls_out_with_the_parameters_of_k_steps_ago():
    """Each 'optimizer step' donates (deletes) the previous state's buffers, as the train
    step does; the source's copies survive, and iteration i rolls out with exactly the
    parameters of step max(0, s - k) (bitwise)."""
    k = 2
    src = RolloutSource(_cfg(staleness=k), _Run())
    state = _State({"w": jnp.asarray([0.25, -1.0])}, 0)
    seen = {0: np.asarray(state.params["w"])}
    for it in range(5):
        params_roll, metrics = src.start(state)
        want_step = max(0, state.step - k)
        np.testing.assert_array_equal(params_roll["w"], seen[want_step])
        assert metrics["rollout/staleness"] == state.step - want_step
        np.testing.assert_array_equal(src.eval_params(params_roll)["w"], seen[state.step])
        for _ in range(2 if it % 2 else 1):  # iterations of 1 or 2 optimizer steps
            new = _State({"w": state.params["w"] * 1.5 + 0.125}, state.step + 1)
            state.params["w"].delete()  # donated
            state = new
            seen[state.step] = np.asarray(state.params["w"])
            src.stepped(state)


def test_rescored_mu_is_the_trainers_forward_masked():
    src = RolloutSource(_cfg(mu="rescored"), _Run())
    state = _State({"w": jnp.asarray([-0.75])}, 0)
    src.start(state)
    mask = jnp.asarray([[1, 1, 0], [1, 0, 0]], jnp.int32)
    batch = {"response_mask": mask, "rollout_logp": jnp.full((2, 3), -9.0)}

    class Host:
        def replace(self, **kw):
            return kw
    new_batch, host = src.rescore(batch, Host())
    want = np.where(np.asarray(mask) > 0, -0.25, 0.0)
    np.testing.assert_array_equal(new_batch["rollout_logp"], want)
    np.testing.assert_array_equal(host["rollout_logp"], want)
    assert src.reuses_score  # staleness 0: the score pass's pi_old is this same forward
    unchanged, _ = RolloutSource(_cfg(), _Run()).rescore(batch, Host())
    assert unchanged is batch
