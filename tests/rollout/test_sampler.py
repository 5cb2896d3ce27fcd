"""Sampler semantics on a bigram toy policy (exact distributions are known)."""
import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustrl.rollout import record as rollout_lib
from trustrl.model.policy import DecodeModel
from trustrl.rollout.sampler import Sampler, SamplerConfig, filter_logits

V = 6


def bigram_model(vocab=V):
    def init_cache(batch, max_len):
        return jnp.zeros((batch, max_len), jnp.int32)

    def prefill(params, tokens, positions, valid, cache):
        return params[tokens[:, -1]], cache

    def decode(params, tokens, positions, cache):
        return params[tokens], cache

    return DecodeModel(init_cache, prefill, decode, vocab)


def table(seed=0, scale=1.5):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(V, V)) * scale, jnp.float32)


def test_group_layout_eos_and_masks():
    params = table()
    params = params.at[:, 5].set(-1e9).at[3, 5].set(1e9)  # token 5 only (always) after 3
    s = Sampler(bigram_model(), SamplerConfig(max_new_tokens=8, eos_ids=(5,), record_topk=3))
    r = s.generate(params, [[1, 2], [3]], group_size=3, key=jax.random.PRNGKey(0))
    assert r.response_tokens.shape == (6, 8) and r.prompt_tokens.shape == (6, 16)
    np.testing.assert_array_equal(r.group_index, [0, 0, 0, 1, 1, 1])
    # prompt [3] -> EOS (5) immediately: one response token, finish = eos
    np.testing.assert_array_equal(r.response_tokens[3:, 0], 5)
    np.testing.assert_array_equal(r.response_mask[3:].sum(1), 1)
    np.testing.assert_array_equal(r.finish_reason[3:], rollout_lib.FINISH_EOS)
    # left padding: the real prompt sits at the right end
    np.testing.assert_array_equal(r.prompt_tokens[0, -2:], [1, 2])
    np.testing.assert_array_equal(r.prompt_mask[0].sum(), 2)
    # after EOS: padding id 0, log-prob 0, top-K padded with id 0 / log-prob 0
    for row in range(6):
        n = int(r.response_mask[row].sum())
        assert np.all(np.asarray(r.response_tokens[row, n:]) == 0)
        assert np.all(np.asarray(r.rollout_logp[row, n:]) == 0)
        assert np.all(np.asarray(r.rollout_topk_ids[row, n:]) == 0)
        if r.finish_reason[row] == rollout_lib.FINISH_LENGTH:
            assert n == 8
        else:
            assert int(r.response_tokens[row, n - 1]) == 5
    rollout_lib.validate(r, vocab_size=V)


def test_rollout_logp_and_topk_match_the_tempered_distribution():
    params, temp = table(1), 0.7
    s = Sampler(bigram_model(), SamplerConfig(max_new_tokens=5, temperature=temp,
                                              record_topk=2))
    r = s.generate(params, [[1], [4]], group_size=4, key=jax.random.PRNGKey(3))
    prev = np.concatenate([np.asarray(r.prompt_tokens[:, -1:]),
                           np.asarray(r.response_tokens[:, :-1])], 1)
    logp_full = jax.nn.log_softmax(params[prev] / temp, axis=-1)  # [B, N, V]
    want = jnp.take_along_axis(logp_full, r.response_tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(r.rollout_logp, want, atol=1e-6)
    # top-K: mu's 2 most likely, sampled token forced into the last slot when absent
    ids, lp = np.asarray(r.rollout_topk_ids), np.asarray(r.rollout_topk_logp)
    order = np.argsort(-np.asarray(logp_full), axis=-1)
    for b in range(8):
        for t in range(5):
            tok = int(r.response_tokens[b, t])
            assert ids[b, t, 0] == order[b, t, 0]
            assert ids[b, t, 1] == (order[b, t, 1] if tok in order[b, t, :2] else tok)
            np.testing.assert_allclose(lp[b, t], np.asarray(logp_full)[b, t, ids[b, t]],
                                       atol=1e-6)


def test_sampled_frequencies_match_softmax():
    # chi-square goodness of fit of the first sampled token over 4096 draws.
    params = table(2, scale=1.0)
    s = Sampler(bigram_model(), SamplerConfig(max_new_tokens=1, temperature=1.3,
                                              record_topk=0))
    r = s.generate(params, [[2]], group_size=4096, key=jax.random.PRNGKey(7))
    counts = np.bincount(np.asarray(r.response_tokens[:, 0]), minlength=V)
    p = np.asarray(jax.nn.softmax(params[2] / 1.3))
    chi2 = float(((counts - 4096 * p) ** 2 / (4096 * p)).sum())
    assert chi2 < 20.5  # 99.9% quantile of chi2 with 5 dof
    assert r.rollout_topk_ids is None


def test_top_p_top_k_filtering_and_warning(recwarn):
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    np.testing.assert_array_equal(jnp.isfinite(filter_logits(logits, 0.7, 0)), [[1, 1, 0, 0]])
    np.testing.assert_array_equal(jnp.isfinite(filter_logits(logits, 0.8, 0)), [[1, 1, 0, 0]])
    np.testing.assert_array_equal(jnp.isfinite(filter_logits(logits, 0.81, 0)), [[1, 1, 1, 0]])
    np.testing.assert_array_equal(jnp.isfinite(filter_logits(logits, 1.0, 3)), [[1, 1, 1, 0]])
    import trustrl.sampler as sampler_mod
    sampler_mod._warned_truncation = False
    params = table(4)
    s = Sampler(bigram_model(), SamplerConfig(max_new_tokens=20, top_k=2, record_topk=0))
    with pytest.warns(UserWarning, match="UNtruncated"):
        r = s.generate(params, [[1]], group_size=64, key=jax.random.PRNGKey(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        s.generate(params, [[1]], group_size=64, key=jax.random.PRNGKey(1))
    top2 = np.argsort(-np.asarray(params), axis=-1)[:, :2]
    prev = np.concatenate([[[1]] * 64, np.asarray(r.response_tokens[:, :-1])], 1)
    assert all(int(r.response_tokens[b, t]) in top2[prev[b, t]]
               for b in range(64) for t in range(20))


def test_greedy_is_argmax_and_deterministic():
    params = table(5)
    s = Sampler(bigram_model(), SamplerConfig(max_new_tokens=6, greedy=True, record_topk=1))
    r1 = s.generate(params, [[0], [3]], 2, jax.random.PRNGKey(0))
    r2 = s.generate(params, [[0], [3]], 2, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(r1.response_tokens, r2.response_tokens)
    tok = 0
    for t in range(6):
        tok = int(np.argmax(params[tok]))
        assert int(r1.response_tokens[0, t]) == tok


def test_no_recompile_within_bucket():
    s = Sampler(bigram_model(), SamplerConfig(max_new_tokens=4, record_topk=2))
    params = table()
    for i, prompts in enumerate([[[1, 2]], [[3, 4, 5]], [[1] * 16], [[2] * 9]]):
        s.generate(params, prompts, 2, jax.random.PRNGKey(i))
    assert s.num_compilations() == 1  # all prompt lengths fall in the 16 bucket
    s.generate(params, [[1] * 17], 2, jax.random.PRNGKey(0))
    assert s.num_compilations() == 2  # the 32 bucket


def test_one_kv_cache_is_kept_and_release_frees_it():
    s = Sampler(bigram_model(), SamplerConfig(max_new_tokens=3, record_topk=2))
    s.generate(table(), [[1, 2]], 2, jax.random.key(0))
    assert list(s._caches) == [(2, 16 + 3)]
    s.generate(table(), [[1] * 20], 2, jax.random.key(0))  # a second prompt bucket (32)
    assert list(s._caches) == [(2, 32 + 3)]  # replaces the first bucket's cache
    s.generate(table(), [[1, 2]], 3, jax.random.key(0))  # more rows
    assert list(s._caches) == [(3, 16 + 3)]
    s.release()
    assert not s._caches


def test_sharded_equals_unsharded():
    from trustrl.infra.sharding import batch_sharding, make_mesh
    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    cfg = SamplerConfig(max_new_tokens=5, record_topk=2)
    params = table(6)
    prompts = [[1, 2], [3], [4, 5, 1], [2]]
    r1 = Sampler(bigram_model(), cfg).generate(params, prompts, 2, jax.random.PRNGKey(0))
    s2 = Sampler(bigram_model(), cfg, batch_sharding=batch_sharding(mesh))
    r2 = s2.generate(params, prompts, 2, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(r1.response_tokens, r2.response_tokens)
    np.testing.assert_allclose(r1.rollout_logp, r2.rollout_logp, atol=1e-6)
    assert r2.response_tokens.sharding.spec[0] == ("data", "fsdp")


@pytest.mark.parametrize("cfg,prompts,msg", [
    (dict(), [[]], "prompt 0 is empty"),
    (dict(max_prompt_len=4), [[1] * 5], "longer than max_prompt_len=4"),
    (dict(record_topk=7), [[1]], "K=7 is larger than the vocabulary"),
    (dict(temperature=0.0), [[1]], "temperature must be > 0 when sampling"),
    (dict(top_p=0.0), [[1]], "top_p must be in"),
    (dict(), [[1, 9]], "outside \\[0, 6\\)"),
    (dict(), [], "no prompts given"),
])
def test_bad_input(cfg, prompts, msg):
    with pytest.raises(ValueError, match=msg):
        cfg = {"record_topk": 2, **cfg}
        Sampler(bigram_model(), SamplerConfig(**cfg)).generate(table(), prompts, 2,
                                                               jax.random.PRNGKey(0))


def test_mismatch_stats_and_validate_errors():
    stats = rollout_lib.mismatch_stats(jnp.log(jnp.array([[0.5, 0.2, 0.9]])),
                                       jnp.log(jnp.array([[0.4, 0.3, 0.1]])),
                                       jnp.array([[1, 1, 0]]))
    assert float(stats["rollout/mismatch_mean"]) == pytest.approx(0.1, rel=1e-5)
    assert float(stats["rollout/mismatch_max"]) == pytest.approx(0.1, rel=1e-5)
    assert float(stats["rollout/mismatch_min"]) == pytest.approx(-0.1, rel=1e-5)
    s = Sampler(bigram_model(), SamplerConfig(max_new_tokens=3, record_topk=2))
    r = s.generate(table(), [[1]], 2, jax.random.PRNGKey(0))
    bad = r.replace(rollout_logp=r.rollout_logp.at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="non-finite values on response tokens"):
        rollout_lib.validate(bad)
    with pytest.raises(ValueError, match="positive log-probs"):
        rollout_lib.validate(r.replace(rollout_logp=r.rollout_logp.at[0, 0].set(0.5)))
    with pytest.raises(ValueError, match="response_mask has shape"):
        rollout_lib.validate(r.replace(response_mask=r.response_mask[:, :2]))


def test_max_rows_splits_the_rows_into_calls_of_that_many():
    params = table(7)
    prompts = [[1, 2], [3], [4, 5, 1], [2], [0]]  # 10 rows with groups of 2
    full = SamplerConfig(max_new_tokens=5, record_topk=2)
    parts = SamplerConfig(max_new_tokens=5, record_topk=2, max_rows=4)  # 4 + 4 + 2 (padded)
    key = jax.random.PRNGKey(3)
    s = Sampler(bigram_model(), parts)
    r = s.generate(params, prompts, 2, key)
    assert r.response_tokens.shape == (10, 5) and r.rollout_topk_ids.shape == (10, 5, 2)
    np.testing.assert_array_equal(r.group_index, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    assert s.num_compilations() == 1  # the padded last call has the same shape
    rollout_lib.validate(r, V)
    # part i is the unsplit sampler on its rows with fold_in(key, i)
    expanded = [p for p in prompts for _ in range(2)]
    ref = Sampler(bigram_model(), full)
    for i, start in enumerate(range(0, 10, 4)):
        rows = expanded[start:start + 4]
        rows += [rows[-1]] * (4 - len(rows))
        want = ref.generate(params, rows, 1, jax.random.fold_in(key, i))
        n = min(4, 10 - start)
        np.testing.assert_array_equal(r.response_tokens[start:start + n],
                                      want.response_tokens[:n])
        np.testing.assert_allclose(r.rollout_logp[start:start + n], want.rollout_logp[:n],
                                   atol=1e-6)
    # greedy decoding does not depend on the keys: split == unsplit
    g = [Sampler(bigram_model(), SamplerConfig(max_new_tokens=5, greedy=True, record_topk=0,
                                               max_rows=m)).generate(params, prompts, 2, key)
         for m in (0, 4)]
    np.testing.assert_array_equal(g[0].response_tokens, g[1].response_tokens)
    np.testing.assert_array_equal(g[0].prompt_tokens, g[1].prompt_tokens)


def test_chunked_topk_recording_equals_lax_top_k():
    # a bigram policy over 3,000 ids with coarse (tied) logits: the recorded K-sets of the
    # default chunked top-K (24 chunks of 128, the last padded) equal lax.top_k's, ids and
    # log-probs, ties included
    vocab = 3000
    params = jnp.round(jax.random.normal(jax.random.key(3), (vocab, vocab)) * 4) / 2
    out = {}
    for method in ("lax", "chunked"):
        s = Sampler(bigram_model(vocab), SamplerConfig(max_new_tokens=6, record_topk=20,
                                                       topk_method=method))
        out[method] = s.generate(params, [[1, 2], [7]], group_size=2, key=jax.random.key(0))
    for field in ("response_tokens", "rollout_logp", "rollout_topk_ids", "rollout_topk_logp"):
        np.testing.assert_array_equal(getattr(out["lax"], field), getattr(out["chunked"], field))
    assert SamplerConfig().topk_method == "chunked"
    with pytest.raises(ValueError, match=r"topk_method must be one of \('lax', 'chunked'\)"):
        SamplerConfig(topk_method="sort")


# --- bad inputs fail at the call or at construction, naming the value ----------------------------

def _sampler(**cfg):
    return Sampler(bigram_model(), SamplerConfig(**{"max_new_tokens": 4, "record_topk": 2,
                                                    **cfg}))


KEY = jax.random.PRNGKey(0)


def test_2d_int_array_prompts_equal_list_prompts():
    s = _sampler()
    want = s.generate(table(), [[1, 2, 3], [4, 5, 0]], 2, KEY)
    for prompts in (np.array([[1, 2, 3], [4, 5, 0]], np.int64),
                    jnp.array([[1, 2, 3], [4, 5, 0]], jnp.int32),
                    [np.array([1, 2, 3]), (4, 5, 0)]):
        got = s.generate(table(), prompts, 2, KEY)
        np.testing.assert_array_equal(got.prompt_tokens, want.prompt_tokens)
        np.testing.assert_array_equal(got.response_tokens, want.response_tokens)
    with pytest.raises(ValueError, match=r"prompt array must be 2-D .*got shape \(3,\)"):
        s.generate(table(), np.array([1, 2, 3]), 2, KEY)


@pytest.mark.parametrize("prompts,dtype", [
    ([[1.0, 2.0]], "float64"),  # integral floats too: never rounded
    (np.array([[1.5, 2.0]], np.float32), "float32"),
    ([[True, False]], "bool"),
])
def test_non_integer_token_ids_are_rejected(prompts, dtype):
    with pytest.raises(TypeError, match=rf"prompt 0 has token ids of dtype {dtype}; token ids "
                                        r"must be integers"):
        _sampler().generate(table(), prompts, 2, KEY)


@pytest.mark.parametrize("prompts,err,msg", [
    ([[1, 6]], ValueError, r"prompt 0 has token ids \[6\] outside \[0, 6\) \(vocab_size=6\)"),
    ([[2], [-1, 3]], ValueError, r"prompt 1 has token ids \[-1\] outside \[0, 6\)"),
    ([], ValueError, "no prompts given"),
    (np.zeros((0, 3), np.int32), ValueError, "no prompts given"),
    ([[1], []], ValueError, "prompt 1 is empty"),
    ([[1], [[2, 3]]], ValueError, r"prompt 1 must be a flat sequence .*shape \(1, 2\)"),
    ([[1], [[2, 3], [4]]], ValueError, "prompt 1 is not a flat sequence"),
    ("123", TypeError, "prompts must be a sequence of token-id sequences.*got str"),
    (["12"], TypeError, "prompt 0 is a str, not token ids"),
])
def test_bad_prompts(prompts, err, msg):
    with pytest.raises(err, match=msg):
        _sampler().generate(table(), prompts, 2, KEY)


def test_eos_ids_int_and_list_become_tuples():
    assert SamplerConfig(eos_ids=5).eos_ids == (5,)
    assert SamplerConfig(eos_ids=[5, np.int64(2)]).eos_ids == (5, 2)
    assert SamplerConfig(eos_ids=np.array([3])).eos_ids == (3,)
    params = table().at[:, 5].set(-1e9).at[3, 5].set(1e9)  # 5 always (and only) after 3
    r_int = _sampler(eos_ids=5).generate(params, [[3], [1]], 2, KEY)
    r_tup = _sampler(eos_ids=(5,)).generate(params, [[3], [1]], 2, KEY)
    np.testing.assert_array_equal(r_int.response_tokens, r_tup.response_tokens)
    np.testing.assert_array_equal(r_int.response_mask[:2].sum(1), [1, 1])  # stopped at EOS


@pytest.mark.parametrize("eos,err,msg", [
    ((6,), ValueError, r"eos_ids \[6\] are outside the vocabulary: valid ids are \[0, 6\)"),
    ((2, 7, 9), ValueError, r"eos_ids \[7, 9\] are outside"),
    ((-1,), ValueError, "eos_ids must be >= 0, got -1"),
    ((1.0,), TypeError, "eos_ids must be an int >= 0, got 1.0"),
    ((True,), TypeError, "eos_ids must be an int >= 0, got True"),
    ("2", TypeError, "eos_ids must be an int or a sequence of ints"),
])
def test_bad_eos_ids(eos, err, msg):
    with pytest.raises(err, match=msg):
        _sampler(eos_ids=eos)


@pytest.mark.parametrize("group_size,err,msg", [
    (True, TypeError, r"group_size must be an int >= 1, got True \(bool\)"),
    (2.0, TypeError, r"group_size must be an int >= 1, got 2.0 \(float\)"),
    (0, ValueError, "group_size must be >= 1, got 0"),
])
def test_bad_group_size(group_size, err, msg):
    with pytest.raises(err, match=msg):
        _sampler().generate(table(), [[1]], group_size, KEY)


@pytest.mark.parametrize("field,value,err,msg", [
    ("temperature", math.inf, ValueError, "temperature must be a finite number > 0, got inf"),
    ("temperature", math.nan, ValueError, "temperature must be a finite number > 0, got nan"),
    ("temperature", -1.0, ValueError, r"temperature must be > 0 when sampling \(greedy=False\)"),
    ("temperature", True, ValueError, "temperature must be a finite number > 0, got True"),
    ("top_p", math.nan, ValueError, r"top_p must be a finite number in \(0, 1\], got nan"),
    ("top_p", 1.5, ValueError, r"top_p must be in \(0, 1\], got 1.5"),
    ("max_new_tokens", 0, ValueError, "max_new_tokens must be >= 1, got 0"),
    ("max_new_tokens", 4.0, TypeError, "max_new_tokens must be an int >= 1, got 4.0"),
    ("top_k", -1, ValueError, "top_k must be >= 0, got -1"),
    ("record_topk", True, TypeError, "record_topk must be an int >= 0, got True"),
    ("min_prompt_bucket", 0, ValueError, "min_prompt_bucket must be >= 1, got 0"),
    ("max_prompt_len", "64", TypeError, "max_prompt_len must be an int >= 1, got '64'"),
    ("greedy", "yes", TypeError, "greedy must be a bool, got 'yes'"),
])
def test_sampler_config_fails_at_construction(field, value, err, msg):
    with pytest.raises(err, match=msg):
        SamplerConfig(**{field: value})
    with pytest.raises(err, match=msg):  # dataclasses.replace runs the same checks
        dataclasses.replace(SamplerConfig(), **{field: value})


def test_greedy_still_needs_a_finite_positive_temperature():
    with pytest.raises(ValueError, match=r"temperature must be > 0 \(it defines rollout_logp\)"):
        SamplerConfig(greedy=True, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got inf"):
        SamplerConfig(greedy=True, temperature=math.inf)


def test_vocab_dependent_checks_at_sampler_construction():
    with pytest.raises(ValueError, match=r"top_k must be in \[0, vocab_size=6\], got 7"):
        _sampler(top_k=7)
    with pytest.raises(ValueError, match="record_topk K=7 is larger than the vocabulary"):
        _sampler(record_topk=7)


def test_rejected_call_leaves_the_sampler_usable():
    s = _sampler()
    want = s.generate(table(), [[1, 2]], 2, KEY)
    with pytest.raises(ValueError, match="outside"):
        s.generate(table(), [[1, 9]], 2, KEY)
    with pytest.raises(TypeError, match="group_size"):
        s.generate(table(), [[1, 2]], True, KEY)
    got = s.generate(table(), [[1, 2]], 2, KEY)
    np.testing.assert_array_equal(got.response_tokens, want.response_tokens)
    assert s.num_compilations() == 1
