"""Gradient accumulation inside the train step (train.microbatches): exact, sharded, validated."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from trustrl.training import config_validation
from trustrl.infra import sharding
from trustrl.training import optim, step as ts
from trustrl.model.transformer import ModelConfig, init_params

B, P, N, V = 8, 3, 5, 32


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    toks = jnp.asarray(rng.integers(1, V, (B, P + N)), jnp.int32)
    valid = jnp.ones((B, P + N), jnp.int32)
    # ragged responses (rows of 1..5 tokens, one empty) so per-sequence and per-token
    # aggregations differ and micro-batches hold unequal token counts
    lengths = np.array([5, 1, 3, 0, 2, 5, 4, 1])
    mask = (np.arange(N)[None] < lengths[:, None]).astype(np.float32)
    return dict(tokens=toks, valid=valid, positions=jnp.cumsum(valid, 1) - 1,
                response_tokens=toks[:, P:], response_mask=jnp.asarray(mask),
                rollout_logp=jnp.asarray(rng.uniform(-4.0, -0.5, (B, N)), jnp.float32),
                advantages=jnp.asarray(rng.normal(size=B), jnp.float32),
                topk_ids=jnp.asarray(rng.integers(0, V, (B, N, 4)), jnp.int32),
                topk_logp=jnp.asarray(rng.uniform(-6.0, -1.0, (B, N, 4)), jnp.float32))


def _step(method, agg, microbatches, mesh=None):
    mcfg = ModelConfig.tiny(vocab_size=V)
    params = init_params(mcfg, jax.random.key(0), mesh)  # sharded over the mesh when given
    cfg = default.get_config("tiny")
    cfg.loss.method, cfg.loss.agg = method, agg
    cfg.optim.grad_clip = 0.0  # compare raw updates
    tx = optim.make_optimizer(cfg.optim, 10)
    state = ts.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), skipped=jnp.zeros((), jnp.int32))
    roll = jax.tree.map(lambda x: x * 1.01, params)  # a mu that differs from pi
    fn = jax.jit(functools.partial(ts.train_step, model_cfg=mcfg, loss_cfg=cfg.loss, tx=tx,
                                   rollout_model_cfg=mcfg, microbatches=microbatches,
                                   mesh=mesh))
    return fn(state, _batch(), roll)


@pytest.mark.slow
@pytest.mark.parametrize("method,agg,n", [
    ("dppo_binary_tv", "token-sum", 4), ("dppo_topk_kl", "seq-mean-token-mean", 2),
    ("trm_seq", "seq-mean-token-sum-norm", 8),  # n = 8: one row each, one of them empty
    ("opsm", "seq-mean-token-mean", 4)])  # a sequence mask with its own parameter (loss.*)
def test_accumulated_step_equals_one_pass(method, agg, n):
    one, m1 = _step(method, agg, 1)
    acc, mn = _step(method, agg, n)
    assert float(m1["train/grad_norm"]) > 0  # a real update (the comparison can fail)
    np.testing.assert_allclose(float(mn["loss/value"]), float(m1["loss/value"]), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(float(mn["train/grad_norm"]), float(m1["train/grad_norm"]),
                               rtol=1e-5)
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(one.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    for k in m1:  # extremes are exact over micro-batches
        if k.endswith(("_max", "_min")):
            np.testing.assert_allclose(float(mn[k]), float(m1[k]), rtol=1e-6, atol=1e-7)


def test_a_wrong_split_would_differ():
    """The check above has power: dividing each micro-batch by its own denominator (the naive
    accumulation) changes the update for a per-token mean over ragged rows."""
    from trustrl.core import losses
    b = _batch()
    mask = b["response_mask"]
    lp = jnp.zeros_like(mask) - 1.0
    full = losses.policy_loss(lp, b["rollout_logp"], b["advantages"], mask,
                              method="pg_is", delta_low=0.2, delta_high=0.2)[0]
    naive = np.mean([float(losses.policy_loss(lp[i::2], b["rollout_logp"][i::2],
                                              b["advantages"][i::2], mask[i::2], method="pg_is",
                                              delta_low=0.2, delta_high=0.2)[0])
                     for i in range(2)])
    assert abs(naive - float(full)) > 1e-3


@pytest.mark.slow
def test_accumulated_step_sharded_equals_unsharded():
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    one, m1 = _step("dppo_full_kl", "token-mean", 1)  # mu's hidden states and the exact KL
    acc, mn = _step("dppo_full_kl", "token-mean", 2, mesh=mesh)
    assert not acc.params["embedding"].sharding.is_fully_replicated
    np.testing.assert_allclose(float(mn["loss/value"]), float(m1["loss/value"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(one.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_microbatches_must_divide_the_minibatch():
    with pytest.raises(ValueError, match=r"cannot be split into microbatches=3"):
        _step("dppo_binary_tv", "token-mean", 3)
    cfg = default.get_config("tiny")  # minibatch = 4 * 2 / 2 = 4 sequences
    cfg.train.microbatches = 3
    with pytest.raises(ValueError, match=r"minibatch of 4 sequences .* train.microbatches=3"):
        config_validation.validate(cfg)
    cfg.train.microbatches = 0
    with pytest.raises(ValueError, match=r"train.microbatches must be an int >= 1"):
        config_validation.validate(cfg)
    cfg.train.microbatches = 2
    config_validation.validate(cfg)


@pytest.mark.parametrize("sharded", [False, True])
def test_score_pass_in_parts_equals_one_pass(sharded):
    # the score pass (pi_old of the whole iteration) in 2 / 4 / 8 strided parts == in one
    mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=4)) if sharded else None
    mcfg = ModelConfig.tiny_shardable(vocab_size=V)
    params = init_params(mcfg, jax.random.key(1), mesh)
    batch = _batch(3)
    score = lambda n: jax.jit(functools.partial(ts.score, model_cfg=mcfg, temperature=0.7,
                                                mesh=mesh, microbatches=n))(params, batch)
    one = np.asarray(score(1))
    assert one.shape == (B, N) and np.all(one < 0)
    for n in (2, 4, 8):
        np.testing.assert_allclose(np.asarray(score(n)), one, atol=1e-6, rtol=1e-6)
    # the split really is strided and is undone: rows come back in their order
    x = jnp.arange(B * 3).reshape(B, 3)
    np.testing.assert_array_equal(ts.strided_split(x, 4)[1], x[1::4])
    np.testing.assert_array_equal(ts.strided_join(ts.strided_split(x, 4)), x)
    with pytest.raises(ValueError, match="cannot split 8 rows into microbatches=3"):
        score(3)


def test_score_microbatches_default_and_validation():
    cfg = default.get_config("tiny")
    cfg.train.minibatches, cfg.train.microbatches = 2, 2
    assert config_validation.score_microbatches(cfg) == 4  # a train micro-batch's rows
    cfg.train.score_microbatches = 8
    assert config_validation.score_microbatches(cfg) == 8
    config_validation.validate(cfg)
    cfg.train.score_microbatches = 3
    with pytest.raises(ValueError, match="not divisible by train.score_microbatches=3"):
        config_validation.validate(cfg)
