"""Divergences: hand values, float64 references, the binary <= top-K <= exact ordering, sharding."""
import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

from trustrl.core import divergences as dv
from trustrl.infra.sharding import make_mesh


def test_binary_tv_hand_values():
    mu = np.array([[0.5, 1e-4, 0.99]])
    pi = np.array([[0.8, 1e-2, 0.80]])
    got = dv.binary_tv(jnp.log(pi), jnp.log(mu))
    np.testing.assert_allclose(got, [[0.3, 0.0099, 0.19]], rtol=1e-5)


def test_binary_kl_direction_and_value():
    # KL(mu || pi) with mu = 0.5, pi = 0.25 (two buckets: {a}, rest).
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    got = float(dv.binary_kl(jnp.log(0.25), jnp.log(0.5)))  # (logp=pi, rollout_logp=mu)
    assert got == pytest.approx(want, rel=1e-6)
    assert abs(got - reverse) > 1e-2  # the other direction is a different number


def _binary_kl64(pi, mu):
    return mu * math.log(mu / pi) + (1 - mu) * math.log((1 - mu) / (1 - pi))


@pytest.mark.parametrize("mu,pi", [(1 - 1e-7, 1 - 2e-7), (1 - 1e-6, 0.999), (1e-30, 1e-25),
                                   (0.3, 0.3000001), (1e-8, 0.5)])
def test_binary_kl_stable_at_extremes(mu, pi):
    lmu, lpi = np.float32(math.log(mu)), np.float32(math.log(pi))
    # float64 reference on the same (fp32-rounded) log-probs.
    want = _binary_kl64(math.exp(float(lpi)), math.exp(float(lmu)))
    got = float(dv.binary_kl(jnp.float32(lpi), jnp.float32(lmu)))
    assert got == pytest.approx(want, rel=2e-3, abs=1e-12)
    assert np.isfinite(got)


def test_naive_one_minus_p_would_fail():
    # Documents why expm1 is used: fp32 1 - exp(logp) at p = 1 - 1e-7 is off by ~40%.
    lp = np.float32(math.log1p(-1e-7))
    naive = 1 - np.exp(lp)
    good = float(-jnp.expm1(jnp.float32(lp)))
    assert abs(naive - 1e-7) / 1e-7 > 0.1
    assert good == pytest.approx(1e-7, rel=1e-3)


def test_log1mexp_both_regimes():
    for lp in [-1e-9, -1e-4, -0.5, -0.7, -2.0, -30.0]:
        want = math.log(-math.expm1(lp))
        got = float(dv.log1mexp(jnp.float32(lp)))
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert float(dv.log1mexp(jnp.float32(0.0))) == pytest.approx(math.log(dv.MIN_MASS))


def test_build_topk_set_forces_sampled_token():
    logp = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    ids, lp = dv.build_topk_set(logp, jnp.array([1]), k=2)  # sampled inside top-2
    np.testing.assert_array_equal(ids, [[0, 1]])
    ids, lp = dv.build_topk_set(logp, jnp.array([3]), k=2)  # outside: overwrites last slot
    np.testing.assert_array_equal(ids, [[0, 3]])
    np.testing.assert_allclose(jnp.exp(lp), [[0.5, 0.05]], rtol=1e-6)
    ids, _ = dv.build_topk_set(logp, jnp.array([2]), k=3)
    np.testing.assert_array_equal(ids, [[0, 1, 2]])  # sorted by decreasing mu
    with pytest.raises(ValueError, match="k=5 must be in"):
        dv.build_topk_set(logp, jnp.array([0]), k=5)


def test_topk_hand_values():
    # V = 4, K = 2 on mu's set {0, 1}; other bucket = {2, 3}.
    mu = np.array([0.5, 0.3, 0.15, 0.05])
    pi = np.array([0.4, 0.4, 0.1, 0.1])
    ids = jnp.array([[[0, 1]]])
    lmu = jnp.log(jnp.asarray(mu[[0, 1]]))[None, None]
    lpi = jnp.log(jnp.asarray(pi[[0, 1]]))[None, None]
    tv = float(dv.topk_tv(lpi, lmu)[0, 0])
    assert tv == pytest.approx(0.5 * (0.1 + 0.1 + 0.0), abs=1e-6)  # other: 0.2 vs 0.2
    kl = float(dv.topk_kl(lpi, lmu)[0, 0])
    want = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4) + 0.2 * math.log(0.2 / 0.2)
    assert kl == pytest.approx(want, rel=1e-5)
    # gather_logp picks pi's log-probs at mu's ids from logits.
    got = dv.gather_logp(jnp.log(jnp.asarray(pi))[None, None] + 3.0, ids)
    np.testing.assert_allclose(got, lpi, rtol=1e-6)


def _np_full(lmu, lpi):
    pmu, ppi = np.exp(lmu), np.exp(lpi)
    return 0.5 * np.abs(pmu - ppi).sum(-1), (pmu * (lmu - lpi)).sum(-1)


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    return x - (np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
                + x.max(-1, keepdims=True))


@pytest.mark.slow
@settings(max_examples=40, deadline=None, derandomize=True)
@given(hnp.arrays(np.float32, (2, 16), elements=st.floats(-6, 6, width=32)),
       hnp.arrays(np.float32, (2, 16), elements=st.floats(-6, 6, width=32)),
       st.integers(1, 15), st.integers(0, 15))
def test_binary_le_topk_le_exact(logits_mu, logits_pi, k, sampled):
    lmu = jax.nn.log_softmax(jnp.asarray(logits_mu))
    lpi = jax.nn.log_softmax(jnp.asarray(logits_pi))
    sampled = jnp.full((2,), sampled)
    ids, topk_lmu = dv.build_topk_set(lmu, sampled, k)
    topk_lpi = jnp.take_along_axis(lpi, ids, axis=-1)
    lmu_a = jnp.take_along_axis(lmu, sampled[:, None], -1)[:, 0]
    lpi_a = jnp.take_along_axis(lpi, sampled[:, None], -1)[:, 0]
    tol = 1e-5
    b_tv, k_tv = dv.binary_tv(lpi_a, lmu_a), dv.topk_tv(topk_lpi, topk_lmu)
    e_tv = dv.full_tv(jnp.asarray(logits_mu), jnp.asarray(logits_pi))
    b_kl, k_kl = dv.binary_kl(lpi_a, lmu_a), dv.topk_kl(topk_lpi, topk_lmu)
    e_kl = dv.full_kl(jnp.asarray(logits_mu), jnp.asarray(logits_pi))
    assert np.all(b_tv <= k_tv + tol) and np.all(k_tv <= e_tv + tol)
    # fp32 rest masses (1 - sum over the K-set) cost ~1e-4 relative when the "other" bucket is
    # a single token and the bound is tight (top-K == exact in exact arithmetic).
    tol_kl = tol + 2e-4 * np.abs(np.asarray(e_kl))
    assert np.all(b_kl <= k_kl + tol_kl) and np.all(k_kl <= e_kl + tol_kl)
    # exact matches a float64 reference
    want_tv, want_kl = _np_full(_log_softmax64(logits_mu), _log_softmax64(logits_pi))
    np.testing.assert_allclose(e_tv, want_tv, atol=2e-6)
    np.testing.assert_allclose(e_kl, want_kl, atol=2e-5, rtol=1e-4)


def test_topk_with_full_set_equals_exact():
    rng = np.random.default_rng(0)
    lm, lp = rng.normal(size=(3, 8)) * 2, rng.normal(size=(3, 8)) * 2
    lmu, lpi = jax.nn.log_softmax(lm), jax.nn.log_softmax(lp)
    ids, tlmu = dv.build_topk_set(lmu, jnp.zeros(3, jnp.int32), 8)
    tlpi = jnp.take_along_axis(lpi, ids, -1)
    np.testing.assert_allclose(dv.topk_tv(tlpi, tlmu), dv.full_tv(lm, lp), atol=1e-6)
    np.testing.assert_allclose(dv.topk_kl(tlpi, tlmu), dv.full_kl(lm, lp), atol=1e-5)


@pytest.mark.parametrize("fn", [dv.full_tv, dv.full_kl])
def test_full_sharded_equals_unsharded(fn):
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    rng = np.random.default_rng(1)
    # Large logit scale so the max lives in one shard: tests the pmax / psum logsumexp.
    lm = jnp.asarray(rng.normal(size=(4, 3, 64)) * 8, jnp.float32)
    lp = jnp.asarray(rng.normal(size=(4, 3, 64)) * 8, jnp.float32)
    want = fn(lm, lp)
    sh = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
    lm_s, lp_s = jax.device_put(lm, sh), jax.device_put(lp, sh)
    got = jax.jit(lambda a, b: fn(a, b, mesh=mesh))(lm_s, lp_s)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert got.shape == (4, 3)
    # and gradients flow through the sharded logsumexp identically
    g_want = jax.grad(lambda b: fn(lm, b).sum())(lp)
    g_got = jax.jit(jax.grad(lambda b: fn(lm_s, b, mesh=mesh).sum()))(lp_s)
    np.testing.assert_allclose(g_got, g_want, rtol=1e-4, atol=1e-6)


def test_full_sharded_never_gathers_vocab():
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    sh = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
    x = jax.device_put(jnp.zeros((4, 2, 1024)), sh)
    hlo = jax.jit(lambda a, b: dv.full_kl(a, b, mesh=mesh)).lower(x, x).compile().as_text()
    assert "all-gather" not in hlo
    assert "all-reduce" in hlo


def test_full_errors():
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    with pytest.raises(ValueError, match="not divisible"):
        dv.full_tv(jnp.zeros((2, 10)), jnp.zeros((2, 10)), mesh=mesh)
    with pytest.raises(ValueError, match="shapes differ"):
        dv.full_tv(jnp.zeros((2, 8)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="vocab_axis 'model' not in mesh"):
        dv.full_tv(jnp.zeros((2, 8)), jnp.zeros((2, 8)), mesh=mesh, vocab_axis="model")


@pytest.mark.parametrize("vocab,chunk,k", [(1000, 16, 20), (1024, 8, 5), (300, 4, 64),
                                           (50, 7, 3), (40, 8, 20)])
def test_chunked_top_k_equals_lax_top_k_including_ties(vocab, chunk, k):
    # chunks that do not divide the vocabulary (padding), K larger than a chunk, fewer chunks
    # than K (then lax.top_k itself), and many ties (values rounded to a coarse grid, also
    # between chunk maxima) whose order must follow the lower id
    x = jax.random.normal(jax.random.key(vocab), (3, 7, vocab))
    coarse = jnp.round(x * 2) / 2  # ~15 distinct values: ties everywhere, also at rank K
    for arr in (x, coarse):
        want_v, want_i = jax.lax.top_k(arr, k)
        got_v, got_i = dv.top_k(arr, k, "chunked", chunk)
        np.testing.assert_array_equal(got_v, want_v)
        np.testing.assert_array_equal(got_i, want_i)
        assert got_i.dtype == jnp.int32
    logp = jax.nn.log_softmax(coarse, axis=-1)
    sampled = jax.random.randint(jax.random.key(1), (3, 7), 0, vocab)
    for a, b in zip(dv.build_topk_set(logp, sampled, k, "lax"),
                    dv.build_topk_set(logp, sampled, k, "chunked", chunk)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"unknown top-K method 'sort'; choose one of"):
        dv.top_k(x, k, "sort")


# pi's float32 log-probs at mu's top-20 ids for one SmolLM2 token of the real_model notebook
# (perturbed params): the set holds all but 1.76e-7 of the (float32) mass
_NEAR_FULL_SET = [-0.0024535334669053555, -6.118198871612549, -8.840971946716309,
                  -10.761984825134277, -10.748494148254395, -10.65744686126709,
                  -11.049838066101074, -11.374869346618652, -12.046366691589355,
                  -12.619965553283691, -15.368292808532715, -16.16474151611328,
                  -16.043678283691406, -17.006561279296875, -17.959218978881836,
                  -18.219240188598633, -18.463165283203125, -18.80233383178711,
                  -18.816936492919922, -18.75250816345215]


def test_set_logsumexp_keeps_a_tiny_rest_mass_and_logsumexps_gradient():
    x = jnp.asarray(_NEAR_FULL_SET, jnp.float32)
    want = math.log(np.exp(np.asarray(x, np.float64)).sum())  # -1.764e-7, of the float32 inputs
    got = float(dv.set_logsumexp(x))
    assert got == pytest.approx(want, rel=1e-2, abs=1e-10)
    # (jax.nn.logsumexp gave exactly 0.0 here on jax 0.10.2: the rest mass rounded away)
    # the top-K KL's 'other' term then used MIN_MASS: other_mu (1.04e-6 here) * 13.8 of
    # spurious KL; with the accurate rest mass it is other_mu * log(other_mu / 1.76e-7)
    rest = -jnp.expm1(dv.set_logsumexp(x))
    assert float(rest) == pytest.approx(-math.expm1(want), rel=1e-2)
    # the gradient is softmax(x), including ties at the maximum, batched
    y = jax.random.normal(jax.random.key(0), (4, 9)).at[1, 3].set(5.0).at[1, 7].set(5.0)
    np.testing.assert_allclose(dv.set_logsumexp(y), jax.nn.logsumexp(y, axis=-1), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda v: dv.set_logsumexp(v).sum())(y),
                               jax.nn.softmax(y, axis=-1), rtol=1e-5, atol=1e-7)
