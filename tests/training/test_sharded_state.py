"""The train state is created with the parameters' shardings, and the step keeps them."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from configs import default
from trustrl.infra import sharding
from trustrl.training import optim, step as ts
from trustrl.model.transformer import ModelConfig, init_params, param_logical_axes

V = 32


def _setup():
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    mcfg = ModelConfig.tiny(vocab_size=V)
    cfg = default.get_config("tiny")
    tx = optim.make_optimizer(cfg.optim, 10)
    params = init_params(mcfg, jax.random.key(0), mesh)
    return mesh, mcfg, cfg, tx, params


def _spec(sh, ndim):
    return tuple(sh.spec) + (None,) * (ndim - len(sh.spec))


def test_adam_moments_are_sharded_like_their_parameters():
    mesh, mcfg, _, tx, params = _setup()
    state = ts.init_train_state(params, tx, ts.state_shardings(mcfg, tx, mesh))
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
            if hasattr(s, "mu")]
    assert len(adam) == 1
    logical = jax.tree.leaves(param_logical_axes(mcfg), is_leaf=lambda x: isinstance(x, tuple))
    n_sharded = 0
    for p, mu, nu, names in zip(jax.tree.leaves(params), jax.tree.leaves(adam[0].mu),
                                jax.tree.leaves(adam[0].nu), logical):
        want = _spec(sharding.named_sharding(mesh, names), p.ndim)  # the logical rules
        for x in (p, mu, nu):
            assert _spec(x.sharding, x.ndim) == want, (names, x.sharding)
        n_sharded += not mu.sharding.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(mu), 0)
    assert n_sharded >= 3  # embedding, attention and mlp weights are split
    assert adam[0].count.sharding.is_fully_replicated and state.step.sharding.is_fully_replicated
    # each device holds a fraction of the moments, not all of them
    per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(adam[0].mu))
    total = sum(x.nbytes for x in jax.tree.leaves(adam[0].mu))
    assert per_device <= total / 2


def test_train_step_keeps_the_layout_and_compiles_once():
    mesh, mcfg, cfg, tx, params = _setup()
    state_sh = ts.state_shardings(mcfg, tx, mesh)
    state = ts.init_train_state(params, tx, state_sh)
    before = [(x.sharding, x.ndim) for x in jax.tree.leaves(state)]
    step = jax.jit(functools.partial(ts.train_step, model_cfg=mcfg, loss_cfg=cfg.loss, tx=tx,
                                     mesh=mesh),
                   donate_argnums=(0,),
                   out_shardings=(state_sh,
                                  jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
    rng = np.random.default_rng(0)
    b, p, n = 8, 3, 4
    toks = jnp.asarray(rng.integers(1, V, (b, p + n)), jnp.int32)
    valid = jnp.ones((b, p + n), jnp.int32)
    batch = dict(tokens=toks, valid=valid, positions=jnp.cumsum(valid, 1) - 1,
                 response_tokens=toks[:, p:], response_mask=jnp.ones((b, n), jnp.float32),
                 rollout_logp=jnp.full((b, n), -3.0),
                 advantages=jnp.asarray(rng.normal(size=b), jnp.float32))
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    for _ in range(3):
        state, metrics = sharding.cpu_sync(step(state, batch, None))
    assert int(state.step) == 3 and np.isfinite(float(metrics["loss/value"]))
    assert step._cache_size() == 1  # the second and third calls reuse the first compile
    after = [x.sharding for x in jax.tree.leaves(state)]
    for (a, ndim), c in zip(before, after):
        assert a.is_equivalent_to(c, ndim), (a, c)


def test_sharded_sampler_keeps_its_donated_cache_layout_and_compiles_once():
    from trustrl.model import policy
    from trustrl.rollout.sampler import Sampler, SamplerConfig
    mesh, mcfg, _, _, params = _setup()
    sampler = Sampler(policy.decode_model(mcfg), SamplerConfig(max_new_tokens=4, eos_ids=(1,)),
                      batch_sharding=sharding.batch_sharding(mesh))
    prompts = [[3, 4, 5], [6, 7]]
    outs = [sharding.cpu_sync(sampler.generate(params, prompts, 4, jax.random.key(i)))
            for i in range(3)]
    assert sampler.num_compilations() == 1  # the returned cache fits the next call as it is
    (cache,) = sampler._caches.values()
    n_split = 0
    for x in jax.tree.leaves(cache):
        if x.ndim:
            assert _spec(x.sharding, x.ndim)[0] == sharding.BATCH_AXES, x.sharding
        if x.ndim == 4:  # keys / values [batch, kv_heads, length, head_dim]: kv heads on tensor
            assert _spec(x.sharding, 4)[1] == "tensor", x.sharding
            n_split += 1
    assert n_split == 2 * mcfg.num_layers
    for r in outs:
        assert r.response_tokens.sharding.spec[0] == sharding.BATCH_AXES
    # the same keys give the same rollout unsharded
    plain = Sampler(policy.decode_model(mcfg), SamplerConfig(max_new_tokens=4, eos_ids=(1,)))
    ref = plain.generate(params, prompts, 4, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(outs[2].response_tokens),
                                  np.asarray(ref.response_tokens))
    np.testing.assert_allclose(np.asarray(outs[2].rollout_logp), np.asarray(ref.rollout_logp),
                               atol=1e-5)
