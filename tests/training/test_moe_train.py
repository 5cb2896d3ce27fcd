"""The trainer side of mixture-of-experts policies (issue 28): routing replay (R3) in the train
step and the score pass, the load-balancing loss and load metrics, the routing metrics, and the
dense path left as it was."""
import dataclasses
import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from trustrl.core import losses
from trustrl.infra.sharding import make_mesh
from trustrl.model import policy
from trustrl.model import transformer as M
from trustrl.training import loop, step as ts

V, B, P, N = 32, 8, 3, 5
X, K = 4, 2
LENGTHS = np.array([5, 1, 3, 0, 2, 5, 4, 1])  # ragged responses, one empty row


def _moe_cfg(**overrides):
    fields = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, family="qwen3_moe", num_experts=X,
                  num_experts_per_tok=K, moe_intermediate_size=16, norm_topk_prob=True)
    return M.ModelConfig(**{**fields, **overrides})


CFG = _moe_cfg()


def _batch():
    rng = np.random.default_rng(0)
    toks = jnp.asarray(rng.integers(1, V, (B, P + N)), jnp.int32)
    valid = jnp.ones((B, P + N), jnp.int32).at[0, :2].set(0).at[5, :1].set(0)  # left padding
    mask = (np.arange(N)[None] < LENGTHS[:, None]).astype(np.float32)
    return dict(tokens=toks, valid=valid, positions=M.positions_from_mask(valid),
                response_tokens=toks[:, P:], response_mask=jnp.asarray(mask),
                rollout_logp=jnp.asarray(rng.uniform(-4.0, -0.5, (B, N)), jnp.float32),
                advantages=jnp.asarray(rng.normal(size=B), jnp.float32))


def _params():
    """Parameters whose experts matter: the default init's router gives nearly uniform
    probabilities and its experts small outputs, so both are scaled up."""
    scale = {"router": 20.0, "expert_gate": 5.0, "expert_up": 5.0, "expert_down": 5.0}
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * scale.get(getattr(path[-1], "key", ""), 1.0),
        M.init_params(CFG, jax.random.key(0)))


@functools.lru_cache(maxsize=None)
def _setup():
    """(params, batch with the trainer's own routing recorded as uint8, own ids int32)."""
    params = _params()
    batch = _batch()
    _, moe = M.forward_moe(params, CFG, batch["tokens"], batch["positions"], batch["valid"])
    own = np.asarray(moe["ids"])
    assert own.shape == (B, P + N, len(CFG.sparse_layers), K)
    return params, {**batch, "routed_experts": jnp.asarray(own, jnp.uint8)}, own


def _other(own):
    """Every token to other experts (a distinct pair stays distinct)."""
    return jnp.asarray((own + 1) % X, jnp.uint8)


def _grad_tx():
    """An 'optimizer' that leaves the parameters and stores the gradient as its state: the
    train step's exact gradient is then ``new_state.opt_state``."""
    return optax.GradientTransformation(
        lambda p: jax.tree.map(jnp.zeros_like, p),
        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


def _loss_cfg(method):
    c = default.get_config("tiny").loss
    c.method = method
    return c


def _step(cfg, params, batch, *, method="dppo_binary_tv", mesh=None, **kw):
    """(gradient, metrics) of one train step; mu = the same parameters x 1.01."""
    tx = _grad_tx()
    state = ts.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), skipped=jnp.zeros((), jnp.int32))
    roll = jax.tree.map(lambda x: x * 1.01, params)
    fn = jax.jit(functools.partial(ts.train_step, model_cfg=cfg, loss_cfg=_loss_cfg(method),
                                   tx=tx, rollout_model_cfg=cfg, mesh=mesh, **kw))
    new, metrics = fn(state, batch, roll)
    return jax.device_get(new.opt_state), {k: float(v) for k, v in metrics.items()}


@functools.lru_cache(maxsize=None)
def _moe_step(routes: str, coef: float = 0.0, method: str = "dppo_binary_tv",
              microbatches: int = 1):
    """Cached MoE train steps: routes "none" (own routing), "own" (replay of it), "other"."""
    params, batch, own = _setup()
    if routes == "other":
        batch = {**batch, "routed_experts": _other(own)}
    return _step(CFG, params, batch, method=method, routing_replay=routes != "none",
                 router_aux_loss_coef=coef, microbatches=microbatches)


def _close(a, b, rtol=1e-5, atol=1e-7):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                                                         atol=atol), a, b)


def _router(g):
    return np.asarray(g["layers"]["mlp"]["router"])


# ------------------------------------------------------------------------------------ replay


@pytest.mark.slow
def test_replaying_the_trainers_own_routing_equals_no_replay():
    g_route, m_route = _moe_step("none")
    g_replay, m_replay = _moe_step("own")
    assert np.abs(_router(g_replay)).max() > 1e-5  # the router keeps its gradient
    np.testing.assert_allclose(m_replay["loss/value"], m_route["loss/value"], rtol=1e-6)
    _close(g_replay, g_route)
    assert m_replay.keys() == m_route.keys()
    for k in m_route:
        np.testing.assert_allclose(m_replay[k], m_route[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # the score pass replays too (and in parts); without replay it is policy.response_head
    params, batch, _ = _setup()
    own = jax.jit(functools.partial(ts.score, model_cfg=CFG))(params, batch)
    replayed = jax.jit(functools.partial(ts.score, model_cfg=CFG, routing_replay=True,
                                         microbatches=2))(params, batch)
    np.testing.assert_allclose(replayed, own, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_router_gradient_under_replay_equals_a_slow_reference():
    """Replay of other experts: the train step's loss and gradient (fused head, ragged experts,
    forward_moe) equal a reference through the one-hot dense experts, [tokens, vocab] logits
    and losses.policy_loss, and the router's directional derivative a finite difference."""
    params, batch, own = _setup()
    other = _other(own)
    g, m = _moe_step("other", method="pg_is")
    _, m_own = _moe_step("none", method="pg_is")
    assert abs(m["loss/value"] - m_own["loss/value"]) > 1e-3  # other experts: another loss
    ref_cfg = dataclasses.replace(CFG, moe_impl="dense", remat="none")
    args = (batch["tokens"], batch["positions"], batch["valid"])

    def ref_loss(p):
        hidden = M.forward(p, ref_cfg, *args, routes=other.astype(jnp.int32))
        logits = M.lm_head(p, ref_cfg, policy.response_logits_slice(hidden, P, N))
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1),
                                   batch["response_tokens"][..., None], -1)[..., 0]
        c = _loss_cfg("pg_is")
        return losses.policy_loss(logp, batch["rollout_logp"], batch["advantages"],
                                  batch["response_mask"], method="pg_is",
                                  delta_low=c.delta_low, delta_high=c.delta_high,
                                  agg=c.agg)[0]

    value, g_ref = jax.value_and_grad(ref_loss)(params)
    np.testing.assert_allclose(m["loss/value"], float(value), rtol=1e-5)
    assert np.abs(_router(g)).max() > 1e-5
    np.testing.assert_allclose(_router(g), _router(g_ref), rtol=1e-4, atol=1e-8)
    _close(g, g_ref, rtol=1e-4, atol=1e-7)
    # finite difference along the router's gradient (routing is fixed by replay: smooth)
    d = jax.tree.map(jnp.zeros_like, params)
    d["layers"]["mlp"]["router"] = jnp.asarray(_router(g) / np.linalg.norm(_router(g)))
    eps = 1e-2
    shifted = [float(ref_loss(jax.tree.map(lambda p, v: p + s * eps * v, params, d)))
               for s in (1.0, -1.0)]
    np.testing.assert_allclose((shifted[0] - shifted[1]) / (2 * eps),
                               np.linalg.norm(_router(g)), rtol=2e-2)


def test_replay_needs_recorded_experts_of_the_right_shape():
    params, batch, own = _setup()
    kw = dict(model_cfg=CFG, loss_cfg=_loss_cfg("dppo_binary_tv"), tx=_grad_tx())
    state = ts.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None,
                          skipped=jnp.zeros((), jnp.int32))
    bare = {k: v for k, v in batch.items() if k != "routed_experts"}
    missing = "model.routing_replay=True but the batch has no routed_experts"
    with pytest.raises(ValueError, match=missing):
        ts.train_step(state, bare, params, routing_replay=True, **kw)
    with pytest.raises(ValueError, match=missing):
        ts.score(params, bare, model_cfg=CFG, routing_replay=True)
    with pytest.raises(ValueError, match=r"routed_experts has shape \(8, 8, 2, 1\); routing "
                                         r"replay needs \(8, 8, 2, 2\)"):
        ts.train_step(state, {**bare, "routed_experts": batch["routed_experts"][..., :1]},
                      params, routing_replay=True, **kw)
    with pytest.raises(ValueError, match="integer expert ids"):
        ts.score(params, {**bare, "routed_experts": jnp.zeros((B, P + N, 2, K))},
                 model_cfg=CFG, routing_replay=True)
    dense = M.ModelConfig.tiny(vocab_size=V)
    with pytest.raises(ValueError, match="routing_replay=True needs a mixture-of-experts model"):
        ts.train_step(state, batch, params, routing_replay=True,
                      **{**kw, "model_cfg": dense})
    with pytest.raises(ValueError, match=r"router_aux_loss_coef=0.1 must be >= 0, and 0 for a "
                                         r"model without mixture-of-experts layers"):
        ts.train_step(state, bare, params, router_aux_loss_coef=0.1, **{**kw, "model_cfg": dense})
    with pytest.raises(ValueError, match=r"router_aux_loss_coef=-1.0 must be >= 0"):
        ts.train_step(state, bare, params, router_aux_loss_coef=-1.0, **kw)
    with pytest.raises(ValueError, match="routing metrics need a mixture-of-experts model"):
        ts.routing_metrics(params, batch, model_cfg=dense)
    with pytest.raises(ValueError, match=missing):
        ts.routing_metrics(params, bare, model_cfg=CFG)


# ----------------------------------------------------------------------- aux loss and metrics


def _slow_aux(params, cfg, batch, routes):
    """Hugging Face's load-balancing loss by a per-token loop over every sparse layer's router
    inputs (captured with nn.intercept_methods on an unrolled, un-rematerialised model)."""
    flat = dataclasses.replace(M.unrolled_config(cfg), remat="none")
    p = M.unstack_layers(params, cfg)
    inputs = []

    def capture(next_fun, args, kwargs, context):
        if isinstance(context.module, M.MoeMlp) and context.method_name == "__call__":
            inputs.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        M.forward(p, flat, batch["tokens"], batch["positions"], batch["valid"],
                  routes=jnp.asarray(routes, jnp.int32))
    valid = np.asarray(batch["valid"])
    counts, probs, tokens = np.zeros(X), jnp.zeros(X), 0
    for layer, x in zip(flat.sparse_layers, inputs):
        w = p[f"layers_{layer}"]["mlp"]["router"]
        m = flat.sparse_layers.index(layer)
        for b in range(B):
            for t in range(P + N):
                if valid[b, t]:
                    probs = probs + jax.nn.softmax(x[b, t].astype(jnp.float32) @ w)
                    for e in np.asarray(routes)[b, t, m]:
                        counts[e] += 1
                    tokens += 1
    return X * jnp.sum(jnp.asarray(counts / tokens) * probs / tokens)


@pytest.mark.slow
def test_load_balancing_loss_and_its_gradient_equal_a_slow_reference():
    params, batch, own = _setup()
    coef = 0.5
    g0, m0 = _moe_step("own")
    g1, m1 = _moe_step("own", coef)
    aux, g_aux = jax.value_and_grad(_slow_aux)(params, CFG, batch, own)
    np.testing.assert_allclose(m0["moe/aux_loss"], float(aux), rtol=1e-5)  # logged when off
    np.testing.assert_allclose(m1["moe/aux_loss"], float(aux), rtol=1e-5)
    np.testing.assert_allclose(m1["loss/value"] - m0["loss/value"], coef * float(aux),
                               rtol=1e-4)
    diff = jax.tree.map(lambda a, b: (a - b) / coef, g1, g0)
    assert np.abs(_router(g_aux)).max() > 1e-4
    np.testing.assert_allclose(_router(diff), _router(g_aux), rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(diff["embedding"], g_aux["embedding"], rtol=2e-3, atol=1e-6)
    # expert load per layer over the valid tokens, by hand
    valid = np.asarray(batch["valid"]) > 0
    counts = np.stack([np.bincount(own[:, :, m][valid].ravel(), minlength=X)
                       for m in range(own.shape[2])])
    mean = valid.sum() * K / X
    assert m0["moe/load_max"] == counts.max()
    np.testing.assert_allclose(m0["moe/load_mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(m0["moe/imbalance_max"], counts.max(1).max() / mean, rtol=1e-6)
    np.testing.assert_allclose(m0["moe/imbalance_mean"], (counts.max(1) / mean).mean(),
                               rtol=1e-6)


@pytest.mark.slow
def test_micro_batches_sum_the_expert_load():
    g1, m1 = _moe_step("own")
    g2, m2 = _moe_step("own", microbatches=2)
    np.testing.assert_allclose(m2["loss/value"], m1["loss/value"], rtol=1e-5, atol=1e-7)
    _close(g2, g1, rtol=1e-4, atol=1e-7)
    for k in ("moe/load_max", "moe/load_mean", "moe/imbalance_max", "moe/imbalance_mean"):
        assert m2[k] == m1[k], k  # sums over the whole minibatch, not per micro-batch


def _flip_batch():
    """Recorded experts = the trainer's own, but for a few (token, layer) pairs."""
    params, batch, own = _setup()
    rec = own.copy()
    q = P - 1  # the position that predicts response token 0
    rec[0, q, 0] = rec[0, q, 0][::-1]                        # same set, other order: no flip
    rec[1, q, 1, 1] = ({0, 1, 2, 3} - set(rec[1, q, 1])).pop()  # row 1, token 0, layer 1
    for m in (0, 1):                                         # row 2, token 2, both layers
        rec[2, q + 2, m, 0] = ({0, 1, 2, 3} - set(rec[2, q + 2, m])).pop()
    rec[3, q + 1, 0, 0] = ({0, 1, 2, 3} - set(rec[3, q + 1, 0])).pop()  # masked (empty row)
    rec[4, P + N - 1, 0, 0] = ({0, 1, 2, 3} - set(rec[4, P + N - 1, 0])).pop()  # predicts none
    return params, {**batch, "routed_experts": jnp.asarray(rec, jnp.uint8)}


@pytest.mark.slow
def test_routing_metrics_by_hand():
    params, batch = _flip_batch()
    mask = np.asarray(batch["response_mask"]) > 0
    tokens = mask.sum()
    flipped = np.zeros((B, N), bool)
    flipped[1, 0] = flipped[2, 2] = True
    rng = np.random.default_rng(1)
    logp = np.asarray(batch["rollout_logp"]) + rng.uniform(-0.3, 0.3, (B, N)).astype(np.float32)
    d = np.abs(logp - np.asarray(batch["rollout_logp"]))
    fn = jax.jit(functools.partial(ts.routing_metrics, model_cfg=CFG))
    got = {k: float(v) for k, v in fn(params, batch, jnp.asarray(logp)).items()}
    assert set(got) == {"moe/routing_mismatch", "moe/routing_flip_tokens",
                        "moe/logp_absdiff_flipped", "moe/logp_absdiff_unflipped"}
    np.testing.assert_allclose(got["moe/routing_mismatch"], 3 / (tokens * 2), rtol=1e-6)
    np.testing.assert_allclose(got["moe/routing_flip_tokens"], 2 / tokens, rtol=1e-6)
    np.testing.assert_allclose(got["moe/logp_absdiff_flipped"], d[flipped].mean(), rtol=1e-5)
    np.testing.assert_allclose(got["moe/logp_absdiff_unflipped"], d[mask & ~flipped].mean(),
                               rtol=1e-5)
    # logp=None: the trainer's own-routing log-probs (replay off), the replayed ones (on)
    for replay in (False, True):
        score = jax.jit(functools.partial(ts.score, model_cfg=CFG, routing_replay=replay))(
            params, batch)
        d = np.abs(np.asarray(score) - np.asarray(batch["rollout_logp"]))
        got = jax.jit(functools.partial(ts.routing_metrics, model_cfg=CFG, routing_replay=replay,
                                        microbatches=2))(params, batch)
        np.testing.assert_allclose(float(got["moe/routing_mismatch"]), 3 / (tokens * 2),
                                   rtol=1e-6)
        np.testing.assert_allclose(float(got["moe/logp_absdiff_flipped"]), d[flipped].mean(),
                                   rtol=1e-5)
        np.testing.assert_allclose(float(got["moe/logp_absdiff_unflipped"]),
                                   d[mask & ~flipped].mean(), rtol=1e-5)


# ------------------------------------------------------------------ batches, sharding, dense


def test_rollout_batch_and_batch_shapes_carry_routed_experts():
    fields = dict(tokens=jnp.zeros((2, 5), jnp.int32), valid_mask=jnp.ones((2, 5), jnp.int32),
                  positions=jnp.zeros((2, 5), jnp.int32), response_tokens=jnp.zeros((2, 2)),
                  response_mask=jnp.ones((2, 2)), rollout_logp=jnp.zeros((2, 2)),
                  rollout_topk_ids=None, rollout_topk_logp=None, routed_experts=None)
    routed = jnp.zeros((2, 5, 2, K), jnp.uint8)
    assert "routed_experts" not in ts.rollout_batch(types.SimpleNamespace(**fields), [0., 0.])
    with_routes = types.SimpleNamespace(**{**fields, "routed_experts": routed})
    assert ts.rollout_batch(with_routes, [0., 0.])["routed_experts"] is routed
    assert "routed_experts" not in ts.batch_shapes(2, 3, 2)
    shape = ts.batch_shapes(2, 3, 2, routed_experts=CFG)["routed_experts"]
    assert (shape.shape, shape.dtype) == ((2, 5, 2, K), jnp.uint8)
    big = _moe_cfg(num_experts=300, num_experts_per_tok=8)
    assert ts.batch_shapes(2, 3, 2, routed_experts=big)["routed_experts"].dtype == jnp.uint16
    with pytest.raises(ValueError, match="has no mixture-of-experts layers"):
        ts.batch_shapes(2, 3, 2, routed_experts=M.ModelConfig.tiny(vocab_size=V))


@pytest.mark.slow
def test_moe_train_step_sharded_equals_unsharded():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, batch, _ = _setup()
    params = jax.device_put(_setup()[0], M.param_shardings(CFG, mesh))
    assert not params["layers"]["mlp"]["expert_gate"].sharding.is_fully_replicated
    with jax.set_mesh(mesh):
        g, m = _step(CFG, params, batch, mesh=mesh, routing_replay=True,
                     router_aux_loss_coef=0.5)
    g_ref, m_ref = _moe_step("own", 0.5)
    assert m.keys() == m_ref.keys()
    for k in m_ref:
        np.testing.assert_allclose(m[k], m_ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    _close(g, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_dense_train_step_equals_a_direct_computation_and_has_no_moe_metrics():
    cfg = M.ModelConfig.tiny(vocab_size=V)
    params = M.init_params(cfg, jax.random.key(0))
    batch = _batch()
    g, m = _step(cfg, params, batch, method="pg_is")
    assert not [k for k in m if k.startswith("moe/")]
    c = _loss_cfg("pg_is")

    def direct(p):
        logits = policy.response_logits(p, cfg, batch["tokens"], batch["positions"],
                                        batch["valid"], num_response=N)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1),
                                   batch["response_tokens"][..., None], -1)[..., 0]
        return losses.policy_loss(logp, batch["rollout_logp"], batch["advantages"],
                                  batch["response_mask"], method="pg_is", delta_low=c.delta_low,
                                  delta_high=c.delta_high, agg=c.agg)[0]

    value, g_ref = jax.value_and_grad(direct)(params)
    np.testing.assert_allclose(m["loss/value"], float(value), rtol=1e-5)
    _close(g, g_ref, rtol=1e-4, atol=1e-7)
    cfg_run = default.get_config("tiny")
    assert loop.routing_program(cfg_run, cfg, None) is None  # the loop adds nothing for dense


@pytest.mark.slow
def test_a_tiny_moe_run_logs_routing_metrics_with_replay(tmp_path):
    """The loop end to end (default.py:tiny_moe, one iteration, R3 on): the sampler's recorded
    experts reach the score pass, the train step and the routing metrics."""
    cfg = default.get_config("tiny_moe")
    cfg.train.iterations, cfg.eval.every = 1, 0
    cfg.model.routing_replay, cfg.model.router_aux_loss_coef = True, 0.01
    _, metrics = loop.train(cfg, str(tmp_path / "run"))
    for k in ("moe/routing_mismatch", "moe/routing_flip_tokens", "moe/logp_absdiff_flipped",
              "moe/logp_absdiff_unflipped", "moe/aux_loss", "moe/load_max", "moe/load_mean",
              "moe/imbalance_max", "rollout/mismatch_mean"):
        assert k in metrics and np.isfinite(float(metrics[k])), k
    assert 0.0 <= float(metrics["moe/routing_mismatch"]) <= float(
        metrics["moe/routing_flip_tokens"]) <= 1.0
    assert float(metrics["moe/imbalance_max"]) >= 1.0
