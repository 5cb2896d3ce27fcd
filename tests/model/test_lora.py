"""LoRA adapters in the model: step-0 equality, merge, gradients against a slow reference, no
frozen-weight gradient, sharding like the kernels, the quantised base, bad configs."""
import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from trustrl.infra.sharding import make_mesh
from trustrl.model import lora, quant
from trustrl.model import transformer as M

ALL = tuple(lora.TARGETS)
B, T = 2, 7  # 14 tokens: no activation is shaped like a kernel


# jitted (static config): one compile instead of op-by-op dispatch
logits_of = jax.jit(M.forward_logits, static_argnums=1)


def _cfg(family="llama", scan=True, targets=ALL, **kw):
    base = M.ModelConfig.tiny(family=family, scan_layers=scan, **kw)
    return base, dataclasses.replace(base, lora_rank=4, lora_alpha=8.0, lora_targets=targets)


def _inputs(seed=2, vocab=256):
    tokens = jax.random.randint(jax.random.key(seed), (B, T), 0, vocab)
    valid = jnp.arange(T)[None, :] >= jnp.array([[0], [3]])  # row 1 left-padded
    return tokens, M.positions_from_mask(valid), valid


def _random_adapters(cfg, seed=3, scale=0.1):
    adapters = M.init_adapters(cfg, jax.random.key(1))
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(adapters))))
    return jax.tree.map(lambda x: scale * jax.random.normal(next(keys), x.shape), adapters)


@pytest.mark.parametrize("family,scan,dtype", [("llama", True, "float32"),
                                               ("qwen2", False, "float32"),
                                               ("qwen3", True, "bfloat16")])
def test_fresh_adapters_leave_the_model_bitwise_unchanged(family, scan, dtype):
    base_cfg, cfg = _cfg(family, scan, dtype=dtype)
    base = M.init_params(base_cfg, jax.random.key(0))
    adapters = M.init_adapters(cfg, jax.random.key(1))
    # A is PEFT's kaiming-uniform (non-zero, within 1 / sqrt(fan_in)), B is zero
    a = adapters["layers"]["attn"]["q_proj_lora_a"] if scan else \
        adapters["layers_0"]["attn"]["q_proj_lora_a"]
    assert a.dtype == jnp.float32 and 0 < float(jnp.max(jnp.abs(a))) <= 1 / np.sqrt(64)
    assert all(float(jnp.max(jnp.abs(x))) == 0 for p, x in
               jax.tree_util.tree_leaves_with_path(adapters) if "lora_b" in str(p[-1]))
    args = _inputs()
    want = logits_of(base, base_cfg, *args)
    got = logits_of(lora.combine(base, adapters), cfg, *args)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_split_combine_round_trip_and_the_adapter_layout():
    _, cfg = _cfg(targets=("q_proj", "o_proj", "down_proj"))
    params = M.init_params(cfg, jax.random.key(0))
    base, adapters = lora.split(params)
    assert set(adapters["layers"]["attn"]) == {"q_proj_lora_a", "q_proj_lora_b", "o_proj_lora_a",
                                               "o_proj_lora_b"}
    assert set(adapters["layers"]["mlp"]) == {"down_proj_lora_a", "down_proj_lora_b"}
    assert "embedding" in base and not any("lora" in str(p) for p, _ in
                                           jax.tree_util.tree_leaves_with_path(base))
    # o_proj [H, D, E]: A [L, H, D, r], B [L, r, E]; the rank axis carries no logical name
    att = adapters["layers"]["attn"]
    assert att["o_proj_lora_a"].shape == (2, 4, 16, 4) and att["o_proj_lora_b"].shape == (2, 4, 64)
    axes = lora.split(M.param_logical_axes(cfg))[1]["layers"]["attn"]
    assert axes["q_proj_lora_a"] == ("layers", "embed", None)
    assert axes["q_proj_lora_b"] == ("layers", None, "heads", "kv")
    assert jax.tree.structure(lora.combine(base, adapters)) == jax.tree.structure(params)


def test_merged_weights_equal_the_unmerged_adapters_and_a_hand_merge():
    base_cfg, cfg = _cfg()
    params = lora.combine(M.init_params(base_cfg, jax.random.key(0)), _random_adapters(cfg))
    merged, merged_cfg = lora.merge(params, cfg)
    assert merged_cfg == base_cfg
    assert jax.tree.structure(merged) == jax.tree.structure(M.init_params(base_cfg,
                                                                          jax.random.key(0)))
    a = np.asarray(params["layers"]["attn"]["o_proj_lora_a"][1], np.float64)  # [H, D, r]
    b = np.asarray(params["layers"]["attn"]["o_proj_lora_b"][1], np.float64)  # [r, E]
    hand = np.asarray(params["layers"]["attn"]["o_proj"][1]) + 2.0 * np.einsum("hdr,re->hde", a, b)
    np.testing.assert_allclose(merged["layers"]["attn"]["o_proj"][1], hand, rtol=1e-6, atol=1e-7)
    args = _inputs()
    got = logits_of(params, cfg, *args)
    want = logits_of(merged, base_cfg, *args)
    assert float(jnp.max(jnp.abs(got - logits_of(lora.split(params)[0], base_cfg,
                                                        *args)))) > 0.1  # the adapters matter
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


def _loss(logits, tokens, valid):
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    return -jnp.sum(picked * valid[:, 1:])


def test_adapter_gradients_equal_the_full_gradient_projected_onto_the_adapters():
    """d/dA = s G B^T and d/dB = s A^T G with G = d loss / d W at the merged weights (the full
    model's gradient): the slow reference, per target kernel, multi-axis kernels included."""
    base_cfg, cfg = _cfg(scan=False)
    base = M.init_params(base_cfg, jax.random.key(0))
    adapters = _random_adapters(cfg)
    tokens, positions, valid = _inputs()
    loss = lambda p, c: _loss(logits_of(p, c, tokens, positions, valid), tokens, valid)
    got = jax.jit(jax.grad(lambda ad: loss(lora.combine(base, ad), cfg)))(adapters)
    merged, _ = lora.merge(lora.combine(base, adapters), cfg)
    full = jax.jit(jax.grad(lambda p: loss(p, base_cfg)))(merged)
    s = lora.scale(cfg)
    for layer in ("layers_0", "layers_1"):
        for block, names in (("attn", lora.ATTENTION_TARGETS), ("mlp", lora.MLP_TARGETS)):
            for name in names:
                g = np.asarray(full[layer][block][name], np.float64)
                a = np.asarray(adapters[layer][block][name + "_lora_a"], np.float64)
                b = np.asarray(adapters[layer][block][name + "_lora_b"], np.float64)
                nin = lora.TARGETS[name]
                g2 = g.reshape(int(np.prod(g.shape[:nin])), -1)
                a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(b.shape[0], -1)
                want_a = (s * g2 @ b2.T).reshape(a.shape)
                want_b = (s * a2.T @ g2).reshape(b.shape)
                for what, want in (("_lora_a", want_a), ("_lora_b", want_b)):
                    have = np.asarray(got[layer][block][name + what])
                    np.testing.assert_allclose(have, want, rtol=2e-4, atol=2e-5 * np.abs(
                        want).max(), err_msg=f"{layer}.{name}{what}")


def _kernel_shaped_dots(fn, *args, kernels):
    """Shapes of the dot_general outputs in fn's jaxpr (sub-jaxprs too) that equal a kernel's
    flattened 2-D shape: a weight gradient of that kernel."""
    shapes = {(int(np.prod(k.shape[:n])), int(np.prod(k.shape[n:]))) for k, n in kernels}
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                out = tuple(eqn.outvars[0].aval.shape)
                if out in shapes:
                    found.append(out)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_no_gradient_of_a_frozen_weight_is_formed():
    base_cfg, cfg = _cfg(scan=False, targets=("q_proj", "gate_proj"))
    base = M.init_params(base_cfg, jax.random.key(0))
    adapters = _random_adapters(cfg)
    tokens, positions, valid = _inputs()
    loss = lambda p, c: _loss(logits_of(p, c, tokens, positions, valid), tokens, valid)
    layer = base["layers_0"]
    kernels = [(layer["attn"][n], lora.TARGETS[n]) for n in lora.ATTENTION_TARGETS] + [
        (layer["mlp"][n], 1) for n in lora.MLP_TARGETS]
    lora_grad = lambda ad: jax.grad(lambda a: loss(lora.combine(base, a), cfg))(ad)
    assert _kernel_shaped_dots(lora_grad, adapters, kernels=kernels) == []
    # the check can fail: full fine-tuning forms every kernel's gradient
    full_grad = lambda p: jax.grad(lambda q: loss(q, base_cfg))(p)
    found = set(_kernel_shaped_dots(full_grad, base, kernels=kernels))
    assert {(64, 128), (128, 64), (64, 64)} <= found


def test_adapters_shard_like_their_kernels_and_sharded_equals_unsharded():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    base_cfg, cfg = M.ModelConfig.tiny_shardable(), None
    cfg = dataclasses.replace(base_cfg, lora_rank=4, lora_alpha=8.0, lora_targets=ALL)
    sh = M.param_shardings(cfg, mesh)
    attn = sh["layers"]["attn"]
    assert attn["q_proj_lora_a"].spec[:2] == attn["q_proj"].spec[:2]  # layers, embed
    assert tuple(attn["q_proj_lora_b"].spec)[2:] == tuple(attn["q_proj"].spec)[2:]  # heads, kv
    assert not attn["q_proj_lora_b"].is_fully_replicated
    params = lora.combine(M.init_params(base_cfg, jax.random.key(0)), _random_adapters(cfg))
    tokens, positions, valid = _inputs()
    loss = lambda p: _loss(logits_of(p, cfg, tokens, positions, valid), tokens, valid)
    base, adapters = lora.split(params)
    grad = lambda ad, b: jax.grad(lambda a: loss(lora.combine(b, a)))(ad)
    want = jax.jit(grad)(adapters, base)
    base_sh, ad_sh = lora.split(sh)
    with jax.set_mesh(mesh):
        got = jax.jit(grad, out_shardings=ad_sh)(jax.device_put(adapters, ad_sh),
                                                 jax.device_put(base, base_sh))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-6), got, want)


def test_a_quantised_base_equals_a_bf16_model_on_the_dequantised_weights():
    """QLoRA: int8 kernels (per-channel scales) dequantised where used, adapters in float32."""
    base_cfg, cfg = _cfg(dtype="bfloat16")
    qcfg = dataclasses.replace(cfg, weight_quant="int8")
    base = M.init_params(base_cfg, jax.random.key(0))
    qbase = quant.quantize_params(base, "int8", stacked=True)
    adapters = _random_adapters(cfg)
    args = _inputs()
    got = logits_of(lora.combine(qbase, adapters), qcfg, *args)
    deq = quant.dequantize_params(qbase, jnp.bfloat16, stacked=True)
    want = logits_of(lora.combine(deq, adapters), dataclasses.replace(
        cfg, param_dtype="bfloat16"), *args)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert qbase["layers"]["attn"]["q_proj"].dtype == jnp.int8
    # the merge of a quantised base dequantises it (the rollout's weights are float)
    merged, merged_cfg = lora.merge(lora.combine(qbase, adapters), qcfg)
    assert merged_cfg.weight_quant == "" and merged_cfg.lora_rank == 0
    assert "q_proj_scale" not in merged["layers"]["attn"]


@pytest.mark.parametrize("overrides,needle", [
    (dict(lora_rank=0, lora_targets=("q_proj",)), "model.lora.rank=0 must be >= 1"),
    (dict(lora_rank=4, lora_alpha=0.0, lora_targets=("q_proj",)), "model.lora.alpha"),
    (dict(lora_rank=4, lora_alpha=8.0, lora_targets=("qkv",)), "unknown projections"),
    (dict(lora_rank=4, lora_alpha=8.0, lora_targets=()), "model.lora.targets is empty"),
    (dict(lora_rank=4, lora_alpha=8.0, lora_targets=("q_proj",), lora_init="pissa"),
     "model.lora.init"),
])
def test_bad_lora_configs_name_the_field(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        M.ModelConfig.tiny(**overrides)


MOE = dict(family="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)


def test_expert_adapters_one_per_expert_merge_shard_and_start_at_the_base():
    """The MLP targets adapt every expert (moe.Adapted): the ragged (grouped-matmul) and dense
    (one-hot) experts equal the merged model; sharded (experts over fsdp, their width over
    tensor) == unsharded in value and adapter gradient."""
    base_cfg = M.ModelConfig.tiny_shardable(**MOE)
    cfg = dataclasses.replace(base_cfg, lora_rank=4, lora_alpha=8.0, lora_targets=ALL)
    base = M.init_params(base_cfg, jax.random.key(0))
    fresh = M.init_adapters(cfg, jax.random.key(1))
    mlp = fresh["layers"]["mlp"]  # [L, X, in, r] / [L, X, r, out]
    assert mlp["expert_gate_lora_a"].shape == (2, 4, 64, 4)
    assert mlp["expert_down_lora_b"].shape == (2, 4, 4, 64)
    tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, 256)
    valid = jnp.ones((2, 8), bool)
    args = (tokens, M.positions_from_mask(valid), valid)
    y0 = logits_of(base, base_cfg, *args)
    # B = 0: the base's logits (XLA:CPU fuses the MoE program differently: within 1 ulp-ish)
    np.testing.assert_allclose(logits_of(lora.combine(base, fresh), cfg, *args), y0, atol=1e-6)
    adapters = _random_adapters(cfg)
    params = lora.combine(base, adapters)
    merged, merged_cfg = lora.merge(params, cfg)
    for impl in ("ragged", "dense"):
        c, mc = (dataclasses.replace(x, moe_impl=impl) for x in (cfg, merged_cfg))
        got = logits_of(params, c, *args)
        assert float(jnp.max(jnp.abs(got - y0))) > 0.1  # the expert adapters matter
        np.testing.assert_allclose(got, logits_of(merged, mc, *args), rtol=1e-5, atol=2e-5)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    base_sh, ad_sh = lora.split(M.param_shardings(cfg, mesh))
    assert tuple(ad_sh["layers"]["mlp"]["expert_gate_lora_b"].spec) == (None, "fsdp", None,
                                                                         "tensor")
    loss = lambda a, b: jnp.sum(M.forward_logits(lora.combine(b, a), cfg, *args) ** 2)
    want = jax.jit(jax.grad(loss))(adapters, base)
    with jax.set_mesh(mesh):
        got = jax.jit(jax.grad(loss), out_shardings=ad_sh)(jax.device_put(adapters, ad_sh),
                                                           jax.device_put(base, base_sh))
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(w))),
                                   err_msg=jax.tree_util.keystr(path))
