"""R3 on the rollout side: the sampler records the experts a mixture-of-experts policy routed
every processed token to (Rollout.routed_experts), and they are the trainer forward's own
routing on the sampled sequences, so replaying them reproduces that forward. Plain and
continuous-batching samplers, left-padded prompts of different lengths, early EOS, layers
without experts among the sparse ones; the record's checks and the config errors."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustrl.model import policy
from trustrl.model import transformer as M
from trustrl.rollout import record as rollout_lib
from trustrl.rollout.sampler import Sampler, SamplerConfig

V, X, K, N = 64, 6, 2, 6
EOS = tuple(range(1, 10))  # ~1/7 of the mass per step: some rows stop early
_forward_moe = jax.jit(M.forward_moe, static_argnums=1)  # one compile, not op by op


def _moe_cfg(**overrides):
    fields = dict(family="qwen3_moe", num_experts=X, num_experts_per_tok=K,
                  moe_intermediate_size=16, norm_topk_prob=True)
    return M.ModelConfig.tiny(V, **{**fields, **overrides})


def _params(cfg, seed=0):
    """Random init perturbed everywhere, the routers scaled up: clear routing decisions (the
    0.02-std init leaves the router's probabilities within ~1e-3 of each other)."""
    params = M.init_params(cfg, jax.random.key(seed))
    paths, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(paths))

    def perturb(path, x, k):
        x = x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
        return x * 20 if getattr(path[-1], "key", "") == "router" else x
    return jax.tree.unflatten(tree, [perturb(p, x, k) for (p, x), k in zip(paths, keys)])


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(10, V, n).tolist() for n in lengths]


def _processed(r):
    """[B, P + N] bool: the positions whose routing the sampler recorded (real prompt tokens;
    generated response tokens a later decode step consumed: all but the last column)."""
    resp = np.asarray(r.response_mask) > 0
    resp[:, -1] = False
    return np.concatenate([np.asarray(r.prompt_mask) > 0, resp], axis=1)


def _check_against_the_forward(r, cfg, params):
    routes = np.asarray(r.routed_experts)
    b, p = r.prompt_tokens.shape
    m = len(cfg.sparse_layers)
    assert routes.shape == (b, p + N, m, K) and routes.dtype == np.uint8
    rollout_lib.validate(r, vocab_size=V, num_experts=X)
    args = (params, cfg, r.tokens, r.positions, r.valid_mask)
    hidden, moe = _forward_moe(*args)
    ids, done = np.asarray(moe["ids"]), _processed(r)
    np.testing.assert_array_equal(routes[done], ids[done])  # the trainer's routing exactly
    assert not routes[~done].any()  # padding, the last token, after EOS: 0
    # the recorded ids are not trivially equal: several experts used in every layer
    assert all(len(np.unique(routes[done][:, j])) == X for j in range(m))
    # replay (the trainer passes the record as it is): the same forward where it is used
    replayed, again = _forward_moe(*args, routes=r.routed_experts)
    np.testing.assert_array_equal(np.asarray(again["ids"])[done], ids[done])
    np.testing.assert_allclose(np.asarray(replayed)[done], np.asarray(hidden)[done],
                               rtol=1e-5, atol=1e-5)
    # ... and the hidden states that predict the response tokens are among those positions
    resp = np.asarray(r.response_mask) > 0
    assert done[:, p - 1:p + N - 1][resp].all()
    return done


def _rollout_shape_checks(r):
    lengths = np.asarray(r.response_mask).sum(1)
    finish = np.asarray(r.finish_reason)
    assert ((finish == rollout_lib.FINISH_EOS) & (lengths < N - 1)).any()  # early EOS
    assert (lengths == N).any()  # and a row that ran to the cap
    assert len(set(np.asarray(r.prompt_mask).sum(1).tolist())) > 1  # left padding differs


@pytest.mark.slow
def test_decode_model_routes_are_prefill_and_decode():
    # the recording variants compute exactly prefill / decode_step (logits and cache)
    cfg = _moe_cfg()
    params, model = _params(cfg), policy.decode_model(cfg)
    dm = model._replace(**{f: jax.jit(getattr(model, f)) for f in (
        "prefill", "decode", "prefill_routes", "decode_routes")})
    assert (model.num_experts, model.moe_layers, model.experts_per_tok) == (X, 2, K)
    toks = jnp.asarray(_prompts((6, 6, 6)))
    valid = jnp.ones_like(toks).at[0, :2].set(0)
    pos = M.positions_from_mask(valid)
    lg, cache = dm.prefill(params, toks, pos, valid, dm.init_cache(3, 8))
    lg2, cache2, ids = dm.prefill_routes(params, toks, pos, valid, dm.init_cache(3, 8))
    np.testing.assert_array_equal(lg2, lg)
    jax.tree.map(np.testing.assert_array_equal, cache2, cache)
    assert ids.shape == (3, 6, 2, K) and ids.dtype == jnp.int32
    nxt = jnp.asarray([11, 12, 13])
    lg, cache = dm.decode(params, nxt, pos[:, -1] + 1, cache)
    lg2, cache2, ids1 = dm.decode_routes(params, nxt, pos[:, -1] + 1, cache2)
    np.testing.assert_array_equal(lg2, lg)
    jax.tree.map(np.testing.assert_array_equal, cache2, cache)
    full = jnp.concatenate([toks, nxt[:, None]], 1)
    fvalid = jnp.concatenate([valid, jnp.ones((3, 1), valid.dtype)], 1)
    _, moe = _forward_moe(params, cfg, full, M.positions_from_mask(fvalid), fvalid)
    np.testing.assert_array_equal(ids1, moe["ids"][:, -1])
    np.testing.assert_array_equal(np.asarray(ids)[valid > 0], np.asarray(moe["ids"])[:, :6][
        np.asarray(valid) > 0])
    assert policy.decode_model(M.ModelConfig.tiny(V)).prefill_routes is None  # dense: none


@pytest.mark.slow
def test_plain_sampler_records_the_forward_routing():
    cfg = _moe_cfg()
    params = _params(cfg)
    s = Sampler(policy.decode_model(cfg), SamplerConfig(
        max_new_tokens=N, eos_ids=EOS, record_topk=2, record_routes=True))
    r = s.generate(params, _prompts((3, 9, 5)), 2, jax.random.key(1))
    _rollout_shape_checks(r)
    _check_against_the_forward(r, cfg, params)
    # without record_routes: no field, and the same rollout otherwise
    off = Sampler(policy.decode_model(cfg), dataclasses.replace(s.cfg, record_routes=False))
    r0 = off.generate(params, _prompts((3, 9, 5)), 2, jax.random.key(1))
    assert r0.routed_experts is None
    np.testing.assert_array_equal(r0.response_tokens, r.response_tokens)


@pytest.mark.slow
@pytest.mark.parametrize("continuous", [True, False])
def test_continuous_batching_records_rows_through_refilled_slots(continuous):
    # 10 rows through 3 slots refilled one row at a time (continuous) or in 4 calls; layers 0
    # and 2 have experts, layer 1 a dense MLP (M = 2 of L = 3)
    cfg = _moe_cfg(num_layers=3, mlp_only_layers=(1,), scan_layers=False)
    assert cfg.sparse_layers == (0, 2)
    params = _params(cfg, seed=3)
    s = Sampler(policy.decode_model(cfg), SamplerConfig(
        max_new_tokens=N, eos_ids=EOS, record_topk=0, record_routes=True, max_rows=3,
        refill_rows=1, continuous=continuous))
    r = s.generate(params, _prompts((2, 7, 4, 11, 1), seed=5), 2, jax.random.key(2))
    _rollout_shape_checks(r)
    _check_against_the_forward(r, cfg, params)


def test_routes_dtype_and_record_checks():
    assert rollout_lib.routes_dtype(6) == jnp.uint8
    assert rollout_lib.routes_dtype(256) == jnp.uint8  # ids 0..255
    assert rollout_lib.routes_dtype(257) == jnp.uint16
    with pytest.raises(ValueError, match="num_experts must be an int in"):
        rollout_lib.routes_dtype(0)
    b, p, n = 2, 3, 4
    base = rollout_lib.Rollout(
        prompt_tokens=np.ones((b, p), np.int32), prompt_mask=np.ones((b, p), np.int32),
        response_tokens=np.ones((b, n), np.int32), response_mask=np.ones((b, n), np.int32),
        rollout_logp=np.zeros((b, n), np.float32), rollout_topk_ids=None,
        rollout_topk_logp=None, finish_reason=np.zeros(b, np.int32),
        group_index=np.zeros(b, np.int32))
    rollout_lib.validate(base, V, num_experts=X)  # the field is optional
    good = np.zeros((b, p + n, 2, K), np.uint8)
    rollout_lib.validate(base.replace(routed_experts=good), V, num_experts=X)
    bad = [(np.zeros((b, p + n - 1, 2, K), np.uint8), r"shape \(2, 6, 2, 2\), expected \[B, P "
            r"\+ N, M, k\] = \[2, 7, M, k\]"),
           (np.zeros((b, p + n, 2), np.uint8), "expected"),
           (good.astype(np.float32), "dtype float32; expert ids must be integers"),
           (good.astype(np.int32) - 1, "negative expert ids"),
           (good + X, r"expert id 6, outside \[0, num_experts=6\)")]
    for routes, match in bad:
        with pytest.raises(ValueError, match=match):
            rollout_lib.validate(base.replace(routed_experts=routes), V, num_experts=X)
    rollout_lib.validate(base.replace(routed_experts=good + X), V)  # X unknown: not checked


def test_config_errors():
    with pytest.raises(TypeError, match="record_routes must be a bool"):
        SamplerConfig(record_routes=1)
    with pytest.raises(ValueError, match="record_routes=True records the experts .* no experts"):
        Sampler(policy.decode_model(M.ModelConfig.tiny(V)), SamplerConfig(record_routes=True))


@pytest.mark.slow
def test_sharded_sampler_records_the_same_routes():
    # a batch-sharded continuous-batching sampler on a data x fsdp x tensor mesh: the same
    # record as unsharded (greedy), the routes buffer laid out over the batch only
    from trustrl.infra.sharding import batch_sharding, make_mesh
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    cfg = M.ModelConfig.tiny_shardable(V, family="qwen3_moe", num_experts=4,
                                       num_experts_per_tok=K, moe_intermediate_size=16)
    params = _params(cfg, seed=7)
    scfg = SamplerConfig(max_new_tokens=N, greedy=True, eos_ids=EOS, record_topk=0,
                         record_routes=True, max_rows=4)
    prompts = _prompts((5, 2, 9, 1, 3), seed=2)
    want = Sampler(policy.decode_model(cfg), scfg).generate(params, prompts, 2,
                                                           jax.random.key(0))
    sharded = Sampler(policy.decode_model(cfg), scfg, batch_sharding=batch_sharding(mesh))
    placed = jax.device_put(params, M.param_shardings(cfg, mesh))
    with jax.set_mesh(mesh):
        got = sharded.generate(placed, prompts, 2, jax.random.key(0))
    np.testing.assert_array_equal(got.response_tokens, want.response_tokens)
    np.testing.assert_array_equal(got.routed_experts, want.routed_experts)
    assert np.asarray(want.routed_experts).any()
