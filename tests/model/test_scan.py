"""Scanned, rematerialised layers == the unrolled reference: logits, grads, HF round trip, KV
cache, sharding; the attention backends inside the full model."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from trustrl.model import hf
from trustrl.model import transformer as M
from trustrl.model.vocab_head import token_logp_and_entropy
from trustrl.infra.sharding import make_mesh

from test_model import _left_padded, _perturbed  # the same tiny inputs as the model tests

V = 128


def _pair(family="qwen3", **overrides):
    """(unrolled cfg, its params, scanned cfg, the same params stacked)."""
    flat = M.ModelConfig.tiny(V, family, num_layers=3, scan_layers=False, **overrides)
    params = _perturbed(M.init_params(flat, jax.random.key(0)))
    scanned = dataclasses.replace(flat, scan_layers=True)
    return flat, params, scanned, M.stack_layers(jax.tree.map(jnp.copy, params), scanned)


def _loss(params, cfg, tokens, valid):
    positions = M.positions_from_mask(valid)
    logits = M.forward_logits(params, cfg, tokens[:, :-1], positions[:, :-1], valid[:, :-1])
    logp, _ = token_logp_and_entropy(logits, tokens[:, 1:])
    # Only real positions predicting real tokens: a pad query's output is backend-specific garbage.
    return -jnp.sum(logp * valid[:, 1:] * valid[:, :-1])


_value_and_grad = jax.jit(jax.value_and_grad(_loss), static_argnums=1)


@pytest.mark.slow
def test_stacked_layout_and_logical_axes():
    flat, params, scanned, stacked = _pair()
    assert "layers_0" in params and "layers" not in params
    assert set(stacked) == {"embedding", "final_norm", "lm_head", "layers"}
    assert stacked["layers"]["attn"]["q_proj"].shape == (3, 64, 4, 16)
    assert M.param_logical_axes(scanned)["layers"]["attn"]["q_proj"] == (
        "layers", "embed", "heads", "kv")
    assert jax.tree.map(lambda s: s.shape, M.param_shapes(scanned)) == jax.tree.map(
        lambda x: x.shape, stacked)
    back = M.unstack_layers(stacked, scanned)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    assert M.unstack_layers(params, flat) is params and M.stack_layers(params, flat) is params
    with pytest.raises(KeyError, match="stack_layers: params lack"):
        M.stack_layers({"embedding": params["embedding"]}, scanned)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_scanned_equals_unrolled_logits_and_grads(family):
    flat, params, scanned, stacked = _pair(family, remat="none")
    tokens, valid = _left_padded()
    v0, g0 = _value_and_grad(params, flat, tokens, valid)
    v1, g1 = _value_and_grad(stacked, scanned, tokens, valid)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 M.unstack_layers(g1, scanned), g0)


@pytest.mark.parametrize("remat", ["full", "dots"])
@pytest.mark.parametrize("attention", ["xla", "blockwise"])
def test_remat_policies_and_backends_keep_value_and_grad(remat, attention):
    flat, params, _, _ = _pair(remat="none", attention="xla")
    scanned = dataclasses.replace(flat, scan_layers=True, remat=remat, attention=attention,
                                  attention_block_size=4)
    stacked = M.stack_layers(jax.tree.map(jnp.copy, params), scanned)
    tokens, valid = _left_padded(lengths=(6, 12, 2), width=12)
    v0, g0 = _value_and_grad(params, flat, tokens, valid)
    v1, g1 = _value_and_grad(stacked, scanned, tokens, valid)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 M.unstack_layers(g1, scanned), g0)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_a_bf16_scan_saves_its_layer_inputs_as_bit_patterns_on_cpu(monkeypatch, remat):
    """transformer.bits_residual: XLA:CPU would convert the forward scan's bf16 [L, B, T, E]
    stack of saved layer inputs to float32 before the backward loop slices it (a float32 copy
    of the whole stack). Saved as uint16 bit patterns, the stack is held once, as 16-bit, and
    the value and every gradient are the same bitwise."""
    _, _, scanned, stacked = _pair(dtype="bfloat16", remat=remat)
    tokens, valid = _left_padded()
    dims = f"3,{tokens.shape[0]},{tokens.shape[1] - 1},{scanned.hidden_size}"  # L, B, T, E

    def run():
        f = jax.jit(jax.value_and_grad(_loss), static_argnums=1)  # a fresh trace each time
        hlo = f.lower(stacked, scanned, tokens, valid).compile().as_text()
        stacks = {dt: sum(f"= {dt}[{dims}]" in line for line in hlo.splitlines())
                  for dt in ("u16", "bf16", "f32")}
        return f(stacked, scanned, tokens, valid), stacks

    assert M.bits_residual(scanned)
    assert not M.bits_residual(dataclasses.replace(scanned, dtype="float32"))
    assert not M.bits_residual(dataclasses.replace(scanned, remat="none"))
    assert not M.bits_residual(dataclasses.replace(scanned, scan_layers=False))
    got, stacks = run()
    assert stacks["u16"] and not stacks["bf16"] and not stacks["f32"], stacks
    monkeypatch.setattr(M, "bits_residual", lambda config: False)  # the plain bf16 residuals
    want, plain = run()
    assert plain["bf16"] and plain["f32"] and not plain["u16"], plain  # what it removes
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    jax.tree.map(np.testing.assert_array_equal, got[1], want[1])
    assert np.isfinite(float(got[0])) and any(np.abs(np.asarray(g, np.float32)).max() > 0
                                                for g in jax.tree.leaves(got[1]))


def test_remat_bool_compatibility_and_validation():
    assert M.ModelConfig.tiny(V, remat=True).remat == "full"
    assert M.ModelConfig.tiny(V, remat=False) == M.ModelConfig.tiny(V, remat="none")
    defaults = M.ModelConfig.tiny(V)
    assert (defaults.scan_layers, defaults.remat, defaults.attention) == (True, "full", "auto")
    with pytest.raises(ValueError, match=r"unknown remat policy 'some'; valid: \('none', 'full'"):
        M.ModelConfig.tiny(V, remat="some")
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'; valid"):
        M.ModelConfig.tiny(V, attention="flash")
    with pytest.raises(ValueError, match="attention_block_size must be >= 1"):
        M.ModelConfig.tiny(V, attention_block_size=0)


def test_scan_trace_size_does_not_grow_with_depth():
    """The scanned trunk traces one layer: its jaxpr is the same size at 2 and 6 layers (the
    unrolled one grows), which is what keeps compile time flat in depth."""
    def n_eqns(**kw):
        cfg = M.ModelConfig.tiny(V, remat="none", **kw)
        params = M.param_shapes(cfg)
        tokens = jnp.ones((1, 8), jnp.int32)
        jaxpr = jax.make_jaxpr(functools.partial(M.forward, config=cfg))(
            params, tokens=tokens, positions=tokens, valid=tokens)
        return len(jaxpr.eqns)

    assert n_eqns(num_layers=2) == n_eqns(num_layers=6)
    assert n_eqns(num_layers=6, scan_layers=False) > 2 * n_eqns(num_layers=2, scan_layers=False)


@pytest.mark.slow
def test_prefill_and_decode_scanned_equal_unrolled():
    flat, params, scanned, stacked = _pair("qwen2", attention="blockwise",
                                           attention_block_size=4)
    tokens, valid = _left_padded(lengths=(7, 3, 10), width=10)
    positions = M.positions_from_mask(valid)
    outs = {}
    for name, cfg, p in (("flat", flat, params), ("scan", scanned, stacked)):
        prefill = jax.jit(functools.partial(M.prefill, config=cfg))
        decode = jax.jit(functools.partial(M.decode_step, config=cfg))
        cache = M.init_cache(cfg, 3, 14)
        logits, cache = prefill(p, tokens=tokens, positions=positions, valid=valid, cache=cache)
        seq, pos = [logits], positions[:, -1]
        for _ in range(3):
            tok = jnp.argmax(seq[-1], -1).astype(jnp.int32)
            pos = pos + 1
            logits, cache = decode(p, tokens=tok, positions=pos, cache=cache)
            seq.append(logits)
        outs[name] = jnp.stack(seq)
    np.testing.assert_allclose(outs["scan"], outs["flat"], atol=1e-5, rtol=0)
    # and the cache path agrees with the training forward of the same prompt
    full = jax.jit(M.forward_logits, static_argnums=1)(stacked, scanned, tokens, positions, valid)
    np.testing.assert_allclose(outs["scan"][0], full[:, -1], atol=1e-5, rtol=0)


def test_hf_round_trip_of_scanned_params(tmp_path):
    flat, params, scanned, stacked = _pair("qwen3")
    hf.save_hf_dir(stacked, scanned, str(tmp_path / "scan"))
    hf.save_hf_dir(params, flat, str(tmp_path / "flat"))
    from safetensors.numpy import load_file
    a = load_file(str(tmp_path / "scan" / "model.safetensors"))
    b = load_file(str(tmp_path / "flat" / "model.safetensors"))
    assert sorted(a) == sorted(b) and "model.layers.2.mlp.up_proj.weight" in a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    cfg, loaded = hf.load_hf_dir(str(tmp_path / "scan"), remat="full")
    assert cfg.scan_layers and loaded["layers"]["mlp"]["up_proj"].shape == (3, 64, 128)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(stacked))


@pytest.mark.slow
def test_sharded_scanned_equals_unsharded():
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    cfg = M.ModelConfig.tiny_shardable(V, "qwen3", attention="blockwise", attention_block_size=4)
    params = _perturbed(M.init_params(cfg, jax.random.key(0), mesh=mesh))
    assert params["layers"]["attn"]["q_proj"].sharding.spec == P(None, "fsdp", "tensor", None)
    local = jax.device_get(params)
    tokens, valid = _left_padded(lengths=(9, 5, 12, 3))
    v0, g0 = _value_and_grad(local, cfg, tokens, valid)
    fn = jax.jit(jax.value_and_grad(functools.partial(_loss, cfg=cfg)))
    with jax.set_mesh(mesh):
        v1, g1 = fn(params, tokens=tokens, valid=valid)
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g1, g0)
