"""Fused vocabulary head: hand values, plain-head parity (values and gradients), vocabulary
sharding, chunking that does not divide, padding, memory, and the train step that uses it."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from trustrl.core import losses
from trustrl.model import policy, vocab_head as vh
from trustrl.training import step as ts
from trustrl.model.transformer import ModelConfig, init_params
from trustrl.infra.sharding import make_mesh

OUTPUTS = ("logp", "entropy", "topk_logp", "tv", "kl")


def _inputs(b=3, n=7, e=16, v=96, k=5, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    h = jax.random.normal(ks[0], (b, n, e))
    w = 0.5 * jax.random.normal(ks[1], (e, v))
    hm = h + 0.1 * jax.random.normal(ks[2], (b, n, e))
    wm = w + 0.05 * jax.random.normal(ks[3], (e, v))
    y = jax.random.randint(ks[4], (b, n), 0, v)
    ids = jax.random.randint(ks[5], (b, n, k), 0, v)
    g = jax.random.normal(ks[6], (b, n))
    return dict(h=h.astype(dtype), w=w.astype(dtype), hm=hm.astype(dtype), wm=wm.astype(dtype),
                y=y, ids=ids, g=g)


def _call(fn, x, h=None, w=None, layout=1, **kw):
    h = x["h"] if h is None else h
    w = x["w"] if w is None else w
    wm = x["wm"] if layout == 1 else x["wm"].T
    return fn(h, w, x["y"], w_vocab_axis=layout, mu_hidden=x["hm"], mu_w=wm, topk_ids=x["ids"],
              **kw)


def _grads(fn, x, layout=1, **kw):
    w = x["w"] if layout == 1 else x["w"].T
    loss = lambda h, w: jnp.sum(x["g"] * _call(fn, x, h, w, layout, **kw)["logp"])
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x["h"], w)


def test_hand_values_three_token_vocabulary():
    # one token, E = 1, W = [1, 2, 3] (logits z = h * W), h = 1, target 2, mu's h = 0 (uniform).
    h, w = jnp.ones((1, 1)), jnp.array([[1.0, 2.0, 3.0]])
    out = vh.fused_head(h, w, jnp.array([2]), mu_hidden=jnp.zeros((1, 1)), mu_w=w,
                        topk_ids=jnp.array([[0, 2]]), temperature=0.5, vocab_chunk=2)
    z = np.array([2.0, 4.0, 6.0])  # / temperature
    p = np.exp(z - np.log(np.exp(z).sum()))
    q = np.full(3, 1 / 3)
    np.testing.assert_allclose(out["logp"], [np.log(p[2])], rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(out["entropy"], [-(p * np.log(p)).sum()], rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(out["topk_logp"], [np.log(p[[0, 2]])], rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(out["tv"], [0.5 * np.abs(p - q).sum()], rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(out["kl"], [(q * np.log(q / p)).sum()], rtol=2e-6, atol=1e-6)
    # d logp / dh = (W_y - E_p[W]) / T
    dh = jax.grad(lambda h: vh.fused_head(h, w, jnp.array([2]), temperature=0.5)["logp"][0])(h)
    np.testing.assert_allclose(dh, [[(3.0 - (p * np.array([1, 2, 3])).sum()) / 0.5]], rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("token_chunk,vocab_chunk", [(0, 0), (5, 0), (4, 40), (100, 17)])
def test_fused_equals_plain_values_and_grads(temperature, token_chunk, vocab_chunk):
    # token chunks 5 / 4 do not divide the 21 tokens; vocab slices 40 / 17 do not divide 96.
    x = _inputs()
    kw = dict(temperature=temperature, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    got = _call(vh.fused_head, x, **kw)
    want = _call(vh.plain_head, x, temperature=temperature)
    assert set(got) == set(OUTPUTS)
    for k in OUTPUTS:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=1e-5, err_msg=k)
    for a, b in zip(_grads(vh.fused_head, x, **kw), _grads(vh.plain_head, x,
                                                           temperature=temperature)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("mesh_shape", [(2, 1, 4), (1, 2, 4)])
def test_vocab_sharded_4way_equals_unsharded(layout, mesh_shape):
    mesh = make_mesh(mesh_shape)
    x = _inputs(b=4, v=96)
    w = x["w"] if layout == 1 else x["w"].T
    w_spec = P(None, "tensor") if layout == 1 else P("tensor", None)
    w_sh = jax.device_put(w, NamedSharding(mesh, w_spec))
    kw = dict(temperature=0.7, token_chunk=6, vocab_chunk=10)  # 24 per shard: 3 slices
    got = jax.jit(lambda w: _call(vh.fused_head, x, w=w, layout=layout, mesh=mesh, **kw))(w_sh)
    want = _call(vh.fused_head, x, w=w, layout=layout, **kw)
    for k in OUTPUTS:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=1e-5, err_msg=k)
    g_sh = _grads(vh.fused_head, x, layout=layout, mesh=mesh, **kw)
    g = _grads(vh.fused_head, x, layout=layout, **kw)
    for a, b in zip(g_sh, g):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    # and it is the plain head's gradient
    for a, b in zip(g_sh, _grads(vh.plain_head, x, layout=layout, temperature=0.7)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_sharded_head_has_no_vocab_gather():
    """The compiled sharded forward + backward never builds a full-vocabulary tile."""
    mesh = make_mesh((2, 1, 4))
    x = _inputs(b=4, n=16, e=8, v=4096)
    w_sh = jax.device_put(x["w"], NamedSharding(mesh, P(None, "tensor")))
    fn = jax.jit(jax.grad(lambda h, w: jnp.sum(vh.fused_head(h, w, x["y"], mesh=mesh,
                                                             token_chunk=8)["logp"]), (0, 1)))
    hlo = fn.lower(x["h"], w_sh).compile().as_text()
    assert "all-gather" not in hlo
    assert "f32[8,4096]" not in hlo and "f32[8,1024]" in hlo  # local tiles only


def test_padding_tokens_do_not_touch_real_ones():
    # A masked loss (padding rows / columns) gives the plain head's gradient, and changing the
    # hidden states at padded positions changes nothing at real positions.
    x = _inputs()
    mask = jnp.ones((3, 7)).at[0, 4:].set(0).at[2, :].set(0)
    loss = lambda fn: lambda h: jnp.sum(mask * fn(h, x["w"], x["y"], token_chunk=4)["logp"]) \
        if fn is vh.fused_head else jnp.sum(mask * fn(h, x["w"], x["y"])["logp"])
    g_fused = jax.grad(loss(vh.fused_head))(x["h"])
    np.testing.assert_allclose(g_fused, jax.grad(loss(vh.plain_head))(x["h"]), atol=1e-5)
    assert float(jnp.abs(g_fused[2]).max()) == 0.0 and float(jnp.abs(g_fused[0, 4:]).max()) == 0.0
    noisy = x["h"].at[2].set(1e3).at[0, 4:].set(-1e3)
    a = vh.fused_head(x["h"], x["w"], x["y"], token_chunk=4)["logp"]
    b = vh.fused_head(noisy, x["w"], x["y"], token_chunk=4)["logp"]
    np.testing.assert_array_equal(np.asarray(a)[mask > 0], np.asarray(b)[mask > 0])


def test_bf16_inputs_accumulate_in_float32():
    x = _inputs(dtype=jnp.bfloat16, v=512, e=64)
    got = vh.fused_head(x["h"], x["w"], x["y"], token_chunk=8, vocab_chunk=100)
    want = vh.plain_head(x["h"], x["w"], x["y"])
    assert got["logp"].dtype == jnp.float32
    # the same bf16 products summed in float32 in both: agreement at float32 level, far
    # below bf16's own resolution (~4e-3 relative)
    np.testing.assert_allclose(got["logp"], want["logp"], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(got["entropy"], want["entropy"], atol=2e-5, rtol=2e-5)
    dh, dw = jax.grad(lambda h, w: jnp.sum(vh.fused_head(h, w, x["y"], token_chunk=8)["logp"]),
                      (0, 1))(x["h"], x["w"])
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16


def test_non_logp_outputs_carry_no_gradient():
    x = _inputs()
    for k in ("entropy", "topk_logp", "tv", "kl"):
        g = jax.grad(lambda h: jnp.sum(_call(vh.fused_head, x, h=h)[k]))(x["h"])
        assert float(jnp.abs(g).max()) == 0.0, k


@pytest.mark.parametrize("kwargs,needle", [
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(token_chunk=-1), "token_chunk / vocab_chunk must be >= 0"),
    (dict(w_vocab_axis=2), "w must be"),
    (dict(mu_hidden=jnp.zeros((3, 7, 16))), "come together"),
    (dict(topk_ids=jnp.zeros((3, 6, 2), jnp.int32)), "topk_ids"),
])
def test_bad_arguments_name_the_problem(kwargs, needle):
    x = _inputs()
    with pytest.raises(ValueError, match=needle):
        vh.fused_head(x["h"], x["w"], x["y"], **kwargs)


def test_compiled_memory_is_chunk_sized():
    """XLA's memory analysis: the fused forward + backward keeps O(chunk x vocab) temporaries,
    the plain head O(tokens x vocab)."""
    t, e, v = 4096, 64, 8192
    h = jax.ShapeDtypeStruct((t, e), jnp.float32)
    w = jax.ShapeDtypeStruct((e, v), jnp.float32)
    y = jax.ShapeDtypeStruct((t,), jnp.int32)

    def temp_bytes(fn, **kw):
        loss = lambda h, w, y: jnp.sum(fn(h, w, y, **kw)["logp"])
        return jax.jit(jax.grad(loss, (0, 1))).lower(h, w, y).compile().memory_analysis(
        ).temp_size_in_bytes

    plain, fused = temp_bytes(vh.plain_head), temp_bytes(vh.fused_head, token_chunk=256)
    assert plain >= t * v * 4  # at least one [T, V] float32 array
    assert fused < t * v * 4 / 8, (fused, plain)


# ------------------------------------------------------------------------------ the train step

def _plain_loss(params, batch, rollout_params, cfg, roll_cfg, loss_cfg, temperature):
    """The pre-fusion train-step loss: full logits, log_softmax, divergences from logits."""
    from trustrl.core import divergences as dv
    n = batch["response_tokens"].shape[1]
    args = (batch["tokens"], batch["positions"], batch["valid"])
    logits = policy.response_logits(params, cfg, *args, num_response=n, temperature=temperature)
    lp_full, logp, _ = vh.log_softmax_terms(logits, batch["response_tokens"])
    div = None
    if losses.METHODS[loss_cfg.method].divergence == "topk":
        at = jax.lax.stop_gradient(jnp.take_along_axis(lp_full, batch["topk_ids"], axis=-1))
        div = (dv.topk_tv if loss_cfg.method.endswith("tv") else dv.topk_kl)(at,
                                                                          batch["topk_logp"])
    elif losses.METHODS[loss_cfg.method].divergence == "full":
        mu = policy.response_logits(rollout_params, roll_cfg, *args, num_response=n,
                                    temperature=temperature)
        div = (dv.full_tv if loss_cfg.method.endswith("tv") else dv.full_kl)(
            mu, jax.lax.stop_gradient(logits))
    return losses.policy_loss(logp, batch["rollout_logp"], batch["advantages"],
                              batch["response_mask"], method=loss_cfg.method,
                              delta_low=loss_cfg.delta_low, delta_high=loss_cfg.delta_high,
                              divergence=div)[0]


@pytest.mark.slow
@pytest.mark.parametrize("method,tied", [("dppo_full_tv", True), ("dppo_full_kl", False),
                                         ("dppo_topk_tv", False), ("dppo_binary_kl", True)])
def test_train_step_equals_plain_head_update(method, tied):
    import ml_collections
    v, b, p_len, n = 64, 4, 3, 6
    cfg = ModelConfig.tiny(v, tie_word_embeddings=tied, num_layers=1, head_token_chunk=5,
                           head_vocab_chunk=24)
    roll_cfg = policy.rollout_config(cfg, "bfloat16")
    params = init_params(cfg, jax.random.PRNGKey(0))
    ks = jax.random.split(jax.random.PRNGKey(1), 5)
    noisy = jax.tree.map(lambda a, k: a + 0.05 * jax.random.normal(k, a.shape), params,
                         jax.tree.unflatten(jax.tree.structure(params),
                                            jax.random.split(ks[4], len(jax.tree.leaves(params)))))
    roll = policy.cast_params(noisy, roll_cfg)  # a mu far enough from pi to mask tokens
    tokens = jax.random.randint(ks[0], (b, p_len + n), 0, v)
    valid = jnp.ones_like(tokens).at[0, 0].set(0)
    mask = jnp.ones((b, n)).at[1, 4:].set(0)
    topk_ids = jax.random.randint(ks[1], (b, n, 4), 0, v)
    batch = dict(tokens=tokens, valid=valid, positions=jnp.maximum(jnp.cumsum(valid, 1) - 1, 0),
                 response_tokens=tokens[:, p_len:], response_mask=mask,
                 rollout_logp=policy.response_logp(roll, roll_cfg, tokens, jnp.maximum(
                     jnp.cumsum(valid, 1) - 1, 0), valid, num_response=n, temperature=0.7),
                 advantages=jax.random.normal(ks[3], (b,)), topk_ids=topk_ids,
                 topk_logp=-jnp.abs(jax.random.normal(ks[1], (b, n, 4))) - 3.0)
    delta = 0.002 if "binary" in method else 0.02  # binary divergences are the smallest
    loss_cfg = ml_collections.ConfigDict(dict(
        method=method, delta_low=delta, delta_high=delta, is_cap=math.inf, agg="token-mean",
        alpha=0.0, trm_divergence="binary_kl"))
    tx = optax.sgd(1.0)
    state = ts.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          skipped=jnp.zeros((), jnp.int32))
    new, metrics = jax.jit(functools.partial(ts.train_step, model_cfg=cfg, loss_cfg=loss_cfg,
                                             tx=tx, rollout_model_cfg=roll_cfg,
                                             temperature=0.7))(state, batch, roll)
    grads = jax.jit(jax.grad(lambda p, b_, r: _plain_loss(p, b_, r, cfg, roll_cfg, loss_cfg,
                                                          0.7)))(params, batch, roll)
    assert 0.0 < float(metrics["loss/masked_frac"]) < 1.0  # the trust region is exercised
    got = jax.tree.map(lambda p, q: p - q, params, new.params)  # sgd(1.0): the gradient
    # importance ratios up to exp(|log pi - log mu|) scale the gradient: compare relative to
    # its largest entry
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
    for a, b_ in zip(jax.tree.leaves(got), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b_, atol=1e-5 * scale, rtol=1e-4)
    # the scoring pass is the fused head too
    np.testing.assert_allclose(
        jax.jit(functools.partial(ts.score, model_cfg=cfg, temperature=0.7))(params, batch),
        policy.response_logp(params, cfg, tokens, batch["positions"], valid, num_response=n,
                             temperature=0.7), atol=1e-6)


# ----------------------------------------------------------------------- the loss-fused head

def _loss_fused(x, extra, **kw):
    """sum_t a_t exp(logp_t) (+ extra * sum logp^2, which the prediction does not know)."""
    a = x["g"]
    fn = lambda out, ex: ex["a"] * jnp.exp(out["logp"])  # its d / d logp, per token
    def loss(h, w, fused):
        out = vh.fused_head(h, w, x["y"], logp_grad=(fn, {"a": a}) if fused else None, **kw)
        return jnp.sum(a * jnp.exp(out["logp"])) + extra * jnp.sum(out["logp"] ** 2)
    return loss


@pytest.fixture
def corrections():
    return []


@pytest.mark.parametrize("temperature,token_chunk,vocab_chunk", [
    (1.0, 0, 0), (0.7, 5, 0), (0.7, 4, 40), pytest.param(1.0, 4, 40, marks=pytest.mark.slow)])
@pytest.mark.parametrize("extra", [0.0, 0.3])
def test_loss_fused_head_gradient_equals_unfused(temperature, token_chunk, vocab_chunk, extra,
                                                 corrections):
    """The weight gradient formed in the forward pass from the predicted d loss / d logp equals
    the recomputing backward's; a loss the prediction misses (extra) is corrected, exactly."""
    x = _inputs()
    loss = _loss_fused(x, extra, temperature=temperature, token_chunk=token_chunk,
                       vocab_chunk=vocab_chunk,
                       on_correction=lambda err, scale: corrections.append(float(err)))
    want = jax.jit(jax.grad(lambda h, w: loss(h, w, False), argnums=(0, 1)))(x["h"], x["w"])
    got = jax.jit(jax.grad(lambda h, w: loss(h, w, True), argnums=(0, 1)))(x["h"], x["w"])
    jax.effects_barrier()
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=1e-6 * float(jnp.abs(r).max()), rtol=1e-5)
    assert (len(corrections) > 0) == (extra > 0), corrections
    values = jax.jit(lambda h, w: loss(h, w, True))(x["h"], x["w"])
    np.testing.assert_allclose(values, jax.jit(lambda h, w: loss(h, w, False))(x["h"], x["w"]),
                               rtol=1e-6)


@pytest.mark.parametrize("extra", [0.0, 0.3])
def test_loss_fused_head_vocab_sharded_equals_unsharded(extra):
    x = _inputs(b=4)
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    want = jax.jit(jax.grad(_loss_fused(x, extra, temperature=0.7), argnums=(0, 1)),
                   static_argnums=2)(x["h"], x["w"], True)
    got = jax.jit(jax.grad(_loss_fused(x, extra, temperature=0.7, mesh=mesh), argnums=(0, 1)),
                  static_argnums=2)(x["h"], x["w"], True)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=1e-6 * float(jnp.abs(r).max()), rtol=1e-5)


_FAST = ("dppo_binary_tv", "dppo_topk_kl", "dppo_full_tv", "ppo_clip_recompute")


@pytest.mark.parametrize("method", [m if m in _FAST else pytest.param(m, marks=pytest.mark.slow)
                                    for m, spec in losses.METHODS.items() if spec.elementwise])
def test_train_step_loss_fused_equals_unfused(method, corrections):
    """Every elementwise loss: the loss-fused head gives the unfused head's update, and its
    predicted d loss / d logp is what autodiff sends back (no correction)."""
    import ml_collections
    v, b, p_len, n = 64, 4, 3, 6
    cfg = ModelConfig.tiny(v, num_layers=1, head_token_chunk=5)
    roll_cfg = policy.rollout_config(cfg, "bfloat16")
    params = init_params(cfg, jax.random.PRNGKey(0))
    ks = jax.random.split(jax.random.PRNGKey(1), 6)
    tokens = jax.random.randint(ks[0], (b, p_len + n), 0, v)
    valid = jnp.ones_like(tokens)
    pos = jnp.cumsum(valid, 1) - 1
    lp = policy.response_logp(params, cfg, tokens, pos, valid, num_response=n)
    batch = dict(tokens=tokens, valid=valid, positions=pos, response_tokens=tokens[:, p_len:],
                 response_mask=jnp.ones((b, n)).at[1, 4:].set(0),
                 rollout_logp=lp + 0.3 * jax.random.normal(ks[1], (b, n)),
                 old_logp=lp + 0.2 * jax.random.normal(ks[2], (b, n)),
                 advantages=jax.random.normal(ks[3], (b,)),
                 topk_ids=jax.random.randint(ks[4], (b, n, 4), 0, v),
                 topk_logp=-jnp.abs(jax.random.normal(ks[5], (b, n, 4))) - 3.0)
    # thresholds that mask some tokens of this tiny model (probabilities ~1/64)
    delta = {"dppo_binary_kl": 1e-4, "dppo_binary_kl_recompute": 1e-4, "dppo_topk_tv": 0.02,
             "dppo_topk_kl": 0.02, "dppo_full_tv": 0.01, "dppo_full_kl": 0.01}.get(
        method, 0.002 if ("binary" in method or method == "mask_neg") else 0.1)
    loss_cfg = ml_collections.ConfigDict(dict(
        method=method, delta_low=delta, delta_high=delta, is_cap=2.0, agg="seq-mean-token-mean",
        alpha=0.012, trm_divergence="binary_kl",
        # the methods' own parameters, at values that mask some tokens here
        icepop_low=0.8, icepop_high=1.25, kpop_phi=1e-4))
    tx = optax.sgd(1.0)
    state = ts.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          skipped=jnp.zeros((), jnp.int32))
    noisy = jax.tree.map(lambda a: a * 1.3, params)  # mu for the exact methods: other weights

    def update(fused):
        step = jax.jit(functools.partial(ts.train_step, model_cfg=cfg, loss_cfg=loss_cfg, tx=tx,
                                         rollout_model_cfg=roll_cfg, temperature=0.7,
                                         head="loss_fused" if fused else "fused",
                                         on_correction=lambda err, scale: corrections.append(
                                             float(err))))
        args = (state, batch, policy.cast_params(noisy, roll_cfg))
        new, metrics = step(*args)
        conds = str(jax.make_jaxpr(step)(*args)).count("cond[")
        return jax.tree.map(lambda p, q: p - q, params, new.params), metrics, conds

    got, m_got, conds_fused = update(True)
    want, m_want, conds = update(False)
    assert conds_fused > conds  # the loss-fused backward (its cotangent check) is in the step
    jax.effects_barrier()
    assert corrections == []
    assert 0 < float(m_want["loss/masked_frac"]) < 1 or method in ("pg_is", "cispo", "drpo"), (
        float(m_want["loss/masked_frac"]))
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want))
    assert scale > 0
    for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, r, atol=2e-6 * scale, rtol=1e-5)
    for k in m_want:
        np.testing.assert_allclose(m_got[k], m_want[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_loss_fused_step_still_refuses_a_missing_old_logp():
    """A *_recompute method without old_logp gets policy_loss's clear error, not a trace error
    from inside the fused head (no silent substitution of rollout_logp either)."""
    import ml_collections
    cfg = ModelConfig.tiny(64, num_layers=1)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.ones((2, 7), jnp.int32)
    valid = jnp.ones_like(tokens)
    batch = dict(tokens=tokens, valid=valid, positions=jnp.cumsum(valid, 1) - 1,
                 response_tokens=tokens[:, 3:], response_mask=jnp.ones((2, 4)),
                 rollout_logp=jnp.full((2, 4), -1.0), advantages=jnp.ones((2,)))
    loss_cfg = ml_collections.ConfigDict(dict(
        method="ppo_clip_recompute", delta_low=0.2, delta_high=0.2, is_cap=2.0,
        agg="token-mean", alpha=0.0, trm_divergence="binary_kl"))
    tx = optax.sgd(1.0)
    state = ts.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          skipped=jnp.zeros((), jnp.int32))
    with pytest.raises(ValueError, match="needs old_logp"):
        ts.train_step(state, batch, None, model_cfg=cfg, loss_cfg=loss_cfg, tx=tx)
