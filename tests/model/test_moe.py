"""Mixture of experts (trustrl.model.moe, transformer.MoeMlp): routing, the three expert
implementations against each other and a per-token loop, replay (R3) with the router's gradient,
the load-balancing loss, and the MoE decoder (scan, KV cache, sharding, config errors)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustrl.model import moe
from trustrl.model import transformer as M
from trustrl.infra.sharding import make_mesh

X, K, E, F, N = 6, 2, 8, 12, 10


def _weights(key, n_exp=X, e=E, f=F):
    kg, ku, kd, kr = jax.random.split(key, 4)
    return (jax.random.normal(kg, (n_exp, e, f)) * 0.3, jax.random.normal(ku, (n_exp, e, f)) * 0.3,
            jax.random.normal(kd, (n_exp, f, e)) * 0.3, jax.random.normal(kr, (e, n_exp)))


def _loop_reference(x, router, ids, w_gate, w_up, w_down, norm):
    """One token at a time, in numpy-like jnp: softmax, the recorded experts' probabilities
    (renormalised), each expert's SwiGLU."""
    out = []
    for i in range(x.shape[0]):
        p = jax.nn.softmax(x[i] @ router)
        w = p[ids[i]]
        w = w / w.sum() if norm else w
        y = 0.0
        for j in range(ids.shape[1]):
            e = ids[i, j]
            y = y + w[j] * ((jax.nn.silu(x[i] @ w_gate[e]) * (x[i] @ w_up[e])) @ w_down[e])
        out.append(y)
    return jnp.stack(out)


def test_route_takes_the_top_k_and_renormalises():
    probs = jnp.array([[0.1, 0.5, 0.15, 0.25], [0.4, 0.3, 0.2, 0.1]])
    w, ids = moe.route(probs, 2, norm_topk_prob=False)
    np.testing.assert_array_equal(ids, [[1, 3], [0, 1]])
    np.testing.assert_allclose(w, [[0.5, 0.25], [0.4, 0.3]])
    w, _ = moe.route(probs, 2, norm_topk_prob=True)
    np.testing.assert_allclose(w, [[2 / 3, 1 / 3], [4 / 7, 3 / 7]], rtol=1e-6)
    np.testing.assert_allclose(moe.replayed_weights(probs, ids, True), w, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("norm", [False, True])
def test_implementations_agree_with_a_per_token_loop_in_value_and_gradient(norm):
    w_gate, w_up, w_down, router = _weights(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (N, E))
    _, ids = moe.route(moe.router_probs(x, router), K, norm)
    big = moe.capacity(N, K, X, factor=float(X))  # nothing dropped

    def layer(impl):
        def f(x, router, w_gate, w_up, w_down):
            w = moe.replayed_weights(moe.router_probs(x, router), ids, norm)
            return moe.experts(x, ids, w, w_gate, w_up, w_down, impl=impl, capacity_rows=big)
        return f

    args = (x, router, w_gate, w_up, w_down)
    want = _loop_reference(x, router, ids, w_gate, w_up, w_down, norm)
    probe = jax.random.normal(jax.random.key(2), want.shape)
    grad_want = jax.grad(lambda *a: jnp.sum(_loop_reference(a[0], a[1], ids, *a[2:], norm)
                                            * probe), argnums=(0, 1, 2, 3, 4))(*args)
    for impl in moe.IMPLS:
        np.testing.assert_allclose(layer(impl)(*args), want, rtol=2e-5, atol=2e-5, err_msg=impl)
        grads = jax.grad(lambda *a: jnp.sum(layer(impl)(*a) * probe),
                         argnums=(0, 1, 2, 3, 4))(*args)
        for name, g, r in zip(("x", "router", "gate", "up", "down"), grads, grad_want):
            np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-5, err_msg=f"{impl} d/d{name}")
    assert float(jnp.abs(grad_want[1]).max()) > 1e-3  # the router learns through the weights


def test_capacity_drops_the_pairs_past_an_experts_buffer():
    w_gate, w_up, w_down, router = _weights(jax.random.key(3))
    x = jax.random.normal(jax.random.key(4), (N, E))
    w, ids = moe.route(moe.router_probs(x, router), K, True)
    cap = 2
    got = moe.experts(x, ids, w, w_gate, w_up, w_down, impl="capacity", capacity_rows=cap)
    seen, keep = {}, np.zeros(ids.shape, bool)  # first come, first served in token order
    for i, j in np.ndindex(*ids.shape):
        e = int(ids[i, j])
        seen[e] = seen.get(e, 0) + 1
        keep[i, j] = seen[e] <= cap
    assert 0 < (~keep).sum() < keep.size
    want = moe.experts(x, ids, w * keep, w_gate, w_up, w_down, impl="dense")
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(moe.dropped(ids, X, cap), (~keep).mean(), rtol=1e-6)


def test_load_balancing_loss_is_hugging_faces():
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(7, X)).astype(np.float32) for _ in range(3)]  # 3 layers
    mask = np.array([1, 1, 1, 0, 1, 1, 0], np.float32)
    sums = [moe.load_sums(jax.nn.softmax(jnp.asarray(lg)), moe.route(
        jax.nn.softmax(jnp.asarray(lg)), K, False)[1], jnp.asarray(mask)) for lg in logits]
    got = moe.load_balancing_loss(*(sum(s[i] for s in sums) for i in range(3)))
    # by hand: counts of top-k assignments and probabilities over the valid rows of all layers
    counts, probs, rows = np.zeros(X), np.zeros(X), 0.0
    for lg in logits:
        p = np.exp(lg - lg.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        top = np.argsort(-p, axis=-1)[:, :K]
        for i in range(len(mask)):
            counts[top[i]] += mask[i]
        probs += (p * mask[:, None]).sum(0)
        rows += mask.sum()
    np.testing.assert_allclose(got, X * np.sum(counts / rows * probs / rows), rtol=1e-5)
    torch = pytest.importorskip("torch")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
    ref = load_balancing_loss_func(tuple(torch.tensor(lg) for lg in logits), X, K,
                                   torch.tensor(mask)[None])
    np.testing.assert_allclose(got, float(ref), rtol=1e-5)


def _moe_cfg(**overrides):
    fields = dict(family="qwen3_moe", num_experts=X, num_experts_per_tok=K,
                  moe_intermediate_size=16, norm_topk_prob=True)
    return M.ModelConfig.tiny_shardable(vocab_size=64, **{**fields, **overrides})


def _batch(b=4, t=7, vocab=64):
    toks = jax.random.randint(jax.random.key(5), (b, t), 0, vocab)
    valid = jnp.ones((b, t), jnp.int32).at[0, :3].set(0).at[1, :1].set(0)  # left-padded rows
    return toks, M.positions_from_mask(valid), valid


@pytest.mark.slow
def test_replayed_routes_reproduce_the_forward_and_keep_the_router_gradient():
    cfg = _moe_cfg()
    params = M.init_params(cfg, jax.random.key(0))
    args = _batch()
    hidden, stats = M.forward_moe(params, cfg, *args)
    assert stats["ids"].shape == (4, 7, cfg.num_layers, K) and stats["counts"].shape == (2, X)
    np.testing.assert_array_equal(stats["tokens"], [float(args[2].sum())] * 2)
    np.testing.assert_array_equal(stats["counts"].sum(-1), stats["tokens"] * K)
    replayed, again = M.forward_moe(params, cfg, *args, routes=stats["ids"])
    np.testing.assert_array_equal(again["ids"], stats["ids"])  # replay routes exactly there
    np.testing.assert_allclose(replayed, hidden, rtol=1e-6, atol=1e-6)

    def loss(p, routes):
        return jnp.sum(M.forward(p, cfg, *args, routes=routes) ** 2)

    g_replay = jax.grad(loss)(params, stats["ids"])["layers"]["mlp"]["router"]
    g_route = jax.grad(loss)(params, None)["layers"]["mlp"]["router"]
    assert float(jnp.abs(g_replay).max()) > 1e-4
    np.testing.assert_allclose(g_replay, g_route, rtol=1e-4, atol=1e-6)  # same experts: same


def test_replay_of_other_experts_changes_the_output_not_the_gradients_path():
    cfg = _moe_cfg()
    params = M.init_params(cfg, jax.random.key(0))
    args = _batch()
    _, stats = M.forward_moe(params, cfg, *args)
    other = (stats["ids"] + 1) % X  # every token to other experts
    hidden, again = M.forward_moe(params, cfg, *args, routes=other)
    np.testing.assert_array_equal(again["ids"], other)
    assert float(jnp.abs(hidden - M.forward(params, cfg, *args)).max()) > 1e-4
    g = jax.grad(lambda p: jnp.sum(M.forward(p, cfg, *args, routes=other) ** 2))(params)
    assert float(jnp.abs(g["layers"]["mlp"]["router"]).max()) > 1e-4


@pytest.mark.slow
def test_scanned_unrolled_and_heterogeneous_layers():
    cfg = _moe_cfg(num_layers=3)
    params = M.init_params(cfg, jax.random.key(0))
    args = _batch()
    flat = M.unrolled_config(cfg)
    np.testing.assert_allclose(M.forward(M.unstack_layers(params, cfg), flat, *args),
                               M.forward(params, cfg, *args), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="scanned layers must be alike, so set scan_layers"):
        _moe_cfg(num_layers=3, mlp_only_layers=(1,))
    mixed = _moe_cfg(num_layers=4, mlp_only_layers=(0,), decoder_sparse_step=2,
                     scan_layers=False)
    assert mixed.sparse_layers == (1, 3)
    p = M.init_params(mixed, jax.random.key(1))
    assert "router" in p["layers_1"]["mlp"] and "gate_proj" in p["layers_0"]["mlp"]
    assert "gate_proj" in p["layers_2"]["mlp"]
    hidden, stats = M.forward_moe(p, mixed, *args)
    assert stats["ids"].shape == (4, 7, 2, K)
    np.testing.assert_allclose(M.forward(p, mixed, *args, routes=stats["ids"]), hidden,
                               rtol=1e-6, atol=1e-6)  # replay over the sparse layers only


def test_prefill_and_decode_equal_the_full_forward():
    cfg = M.unrolled_config(_moe_cfg())
    params = M.init_params(cfg, jax.random.key(0))
    toks, pos, valid = _batch(t=8)
    full = M.forward_logits(params, cfg, toks, pos, valid)
    cache = M.init_cache(cfg, 4, 8)
    logits, cache = M.prefill(params, cfg, toks[:, :6], pos[:, :6], valid[:, :6], cache)
    np.testing.assert_allclose(logits, full[:, 5], rtol=1e-4, atol=1e-4)
    for t in (6, 7):
        logits, cache = M.decode_step(params, cfg, toks[:, t], pos[:, t], cache)
        np.testing.assert_allclose(logits, full[:, t], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["ragged", "capacity"])
def test_sharded_equals_unsharded(impl):
    cfg = _moe_cfg(moe_impl=impl, moe_capacity_factor=float(X) if impl == "capacity" else 0.0)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params = M.init_params(cfg, jax.random.key(0), mesh=mesh)
    args = _batch()
    with jax.set_mesh(mesh):
        got = jax.jit(M.forward, static_argnums=1)(params, cfg, *args)
        g = jax.jit(jax.grad(lambda p: jnp.sum(M.forward(p, cfg, *args) ** 2)))(params)
    host = jax.device_get(params)
    np.testing.assert_allclose(got, M.forward(host, cfg, *args), rtol=1e-5, atol=1e-5)
    want = jax.grad(lambda p: jnp.sum(M.forward(p, cfg, *args) ** 2))(host)
    for name in ("router", "expert_gate", "expert_down"):
        np.testing.assert_allclose(g["layers"]["mlp"][name], want["layers"]["mlp"][name],
                                   rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("overrides,match", [
    (dict(num_experts_per_tok=7), r"num_experts_per_tok=7 must be in \[1, num_experts=6\]"),
    (dict(num_experts=0), "a mixture of experts is family 'qwen3_moe' with num_experts >= 1"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size"),
    (dict(mlp_only_layers=(5,), scan_layers=False), r"mlp_only_layers \[5\] are not layers"),
    (dict(moe_impl="megablox"), "unknown moe_impl 'megablox'; valid"),
    (dict(moe_impl="capacity"), "moe_capacity_factor=0.0 goes with moe_impl='capacity'"),
])
def test_bad_moe_configs_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        _moe_cfg(**overrides)
    with pytest.raises(ValueError, match="a mixture of experts is family 'qwen3_moe'"):
        dataclasses.replace(M.ModelConfig.tiny(64), num_experts=4)
