"""Hugging Face Qwen3-MoE import / export (trustrl.model.hf): logit parity with transformers'
``Qwen3MoeForCausalLM`` (torch CPU, fp32, left-padded batches) with dense layers among the sparse
ones and norm_topk_prob both ways; export that transformers reloads to the same logits; bit-exact
round trips of the hub's per-expert layout; transformers 5's fused expert layout; index-sharded
exports; errors that name the problem.

Routing near-ties: torch and XLA may order two nearly equal router probabilities differently,
which sends a token to another expert and changes its logits by O(1), not by rounding. The parity
tests scale the routers up (x4, so top-k margins are clear), assert that margin (the k-th minus
the (k+1)-th router logit of every token in every sparse layer, from transformers'
output_router_logits) and that trustrl routes every valid token to exactly the experts
transformers picks, and only then compare logits.
"""
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from trustrl.model import hf
from trustrl.model import transformer as M

V, X, K = 128, 8, 2  # vocabulary, experts, experts per token
COMMON = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=V,
              hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=64,
              tie_word_embeddings=False, num_experts=X, num_experts_per_tok=K,
              moe_intermediate_size=32, rope_parameters={"rope_type": "default",
                                                         "rope_theta": 1e6})
# variant -> (config.json fields, the sparse layers Hugging Face's rule gives)
VARIANTS = {
    "all_sparse_norm": (dict(num_hidden_layers=2, norm_topk_prob=True), (0, 1)),
    "mlp_only_layers": (dict(num_hidden_layers=3, mlp_only_layers=[1], norm_topk_prob=False),
                        (0, 2)),
    "sparse_step2_norm": (dict(num_hidden_layers=4, decoder_sparse_step=2, norm_topk_prob=True),
                          (1, 3)),
    "step2_mlp_only": (dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3],
                            norm_topk_prob=False), (1,)),
}
MIN_MARGIN = 1e-3  # router logit gap at the k-th expert; fp32 rounding is ~1e-6
_logits = jax.jit(M.forward_logits, static_argnums=1)
_forward_moe = jax.jit(M.forward_moe, static_argnums=1)


def _hf_model(fields: dict):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(**{**COMMON, **fields})
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # random init has unit norms: perturb everything, routers up
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.05))
            if name.endswith("mlp.gate.weight"):
                p.mul_(4.0)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    return model.float().eval()


@pytest.fixture(scope="module")
def batch():
    """Two rows of 16 tokens; row 1 left-padded by 5 (pad id 0)."""
    tokens = np.random.default_rng(0).integers(1, V, (2, 16))
    valid = np.ones_like(tokens)
    valid[1, :5] = 0
    tokens[valid == 0] = 0
    return tokens, valid


def _hf_forward(model, batch):
    """(logits [B, T, V], router logits [M, B * T, X]) of transformers on a left-padded batch."""
    import torch
    tokens, valid = batch
    positions = np.clip(np.cumsum(valid, 1) - 1, 0, None)
    with torch.no_grad():
        out = model(torch.tensor(tokens), attention_mask=torch.tensor(valid),
                    position_ids=torch.tensor(positions), output_router_logits=True)
    return out.logits.float().numpy(), np.stack([r.float().numpy() for r in out.router_logits])


def _ours(params, cfg, batch, fn=_logits):
    tokens, valid = (jnp.asarray(a, jnp.int32) for a in batch)
    return jax.device_get(fn(params, cfg, tokens, M.positions_from_mask(valid), valid))


@pytest.mark.slow  # ~15 s each on 2 shared CPU cores (torch + transformers + three jits)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_export_and_roundtrip(variant, batch, tmp_path):
    transformers = pytest.importorskip("transformers")
    fields, sparse = VARIANTS[variant]
    model = _hf_model(fields)
    model.save_pretrained(tmp_path / "hf")
    cfg, params = hf.load_hf_dir(str(tmp_path / "hf"))
    n = fields["num_hidden_layers"]
    assert (cfg.family, cfg.num_experts, cfg.num_experts_per_tok) == ("qwen3_moe", X, K)
    assert cfg.norm_topk_prob == fields["norm_topk_prob"] and cfg.sparse_layers == sparse
    assert cfg.scan_layers == (len(sparse) == n)  # mixed layers load unrolled
    layer = params["layers"] if cfg.scan_layers else params[f"layers_{sparse[0]}"]
    assert set(layer["mlp"]) == {"router", "expert_gate", "expert_up", "expert_down"}

    # routing: clear top-k margins in transformers, and the same experts in trustrl
    want, router_logits = _hf_forward(model, batch)
    assert router_logits.shape == (len(sparse), batch[0].size, X)
    valid = batch[1].astype(bool)
    top = -np.sort(-router_logits, axis=-1)
    margin = (top[..., K - 1] - top[..., K]).reshape(len(sparse), *valid.shape)[:, valid].min()
    assert margin > MIN_MARGIN, margin
    _, moe = _ours(params, cfg, batch, _forward_moe)  # ids [B, T, M, k]
    hf_ids = np.argsort(-router_logits, axis=-1)[..., :K].reshape(len(sparse), *valid.shape, K)
    np.testing.assert_array_equal(np.sort(moe["ids"], -1)[valid],
                                  np.sort(hf_ids.transpose(1, 2, 0, 3), -1)[valid])

    got = _ours(params, cfg, batch)
    diff = np.abs(got - want)[valid].max()
    print(f"\n{variant}: max |trustrl - transformers| logits = {diff:.3g} "
          f"(|logits| <= {np.abs(want).max():.2f}, top-k margin {margin:.3g})")
    assert diff <= 1e-4, diff

    # HF -> trustrl -> HF: the same tensors, bit for bit, in the hub's per-expert layout
    hf.save_hf_dir(params, cfg, str(tmp_path / "out"))
    theirs, ours = load_file(tmp_path / "hf" / "model.safetensors"), load_file(
        tmp_path / "out" / "model.safetensors")
    assert sorted(theirs) == sorted(ours)
    assert f"model.layers.{sparse[0]}.mlp.experts.{X - 1}.down_proj.weight" in ours
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype, name
        np.testing.assert_array_equal(ours[name], tensor, err_msg=name)

    # trustrl's export -> transformers: the same model, the same logits
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager").eval()
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                "decoder_sparse_step", "mlp_only_layers", "head_dim"):
        assert getattr(back.config, key) == getattr(model.config, key), key
    ref_state, back_state = model.state_dict(), back.state_dict()
    assert sorted(ref_state) == sorted(back_state)
    for name, tensor in ref_state.items():
        np.testing.assert_array_equal(back_state[name].numpy(), tensor.numpy(), err_msg=name)
    reloaded, _ = _hf_forward(back, batch)
    assert np.abs(reloaded - got)[valid].max() <= 1e-4


def _fuse(tensors: dict, layers, num_experts: int) -> dict:
    """The per-expert tensors of ``layers`` -> transformers 5's fused gate_up_proj [X, 2F, E]
    (gate rows first) and down_proj [X, E, F]."""
    out = {k: v for k, v in tensors.items()
           if not any(k.startswith(f"model.layers.{i}.mlp.experts.") for i in layers)}
    for i in layers:
        def stack(name):
            return np.stack([tensors[f"model.layers.{i}.mlp.experts.{j}.{name}.weight"]
                             for j in range(num_experts)])
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.concatenate(
            [stack("gate_proj"), stack("up_proj")], axis=1)
        out[f"model.layers.{i}.mlp.experts.down_proj"] = stack("down_proj")
    return out


def test_fused_expert_layout_loads_like_the_hub_layout(batch, tmp_path):
    """transformers 5 keeps experts fused in memory; a model loaded from a fused checkpoint
    saves fused. Both fused files (ours and transformers' own) load to the same params."""
    transformers = pytest.importorskip("transformers")
    fields, sparse = VARIANTS["mlp_only_layers"]
    model = _hf_model(fields)
    model.save_pretrained(tmp_path / "hub")
    cfg, params = hf.load_hf_dir(str(tmp_path / "hub"))

    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    (fused_dir / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    save_file(_fuse(load_file(tmp_path / "hub" / "model.safetensors"), sparse, X),
              fused_dir / "model.safetensors", metadata={"format": "pt"})
    # transformers reads our fused file as the same model (so the layout is its layout) ...
    fused_model = transformers.AutoModelForCausalLM.from_pretrained(
        fused_dir, attn_implementation="eager").eval()
    ref_state = model.state_dict()
    for name, tensor in fused_model.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), ref_state[name].numpy(), err_msg=name)
    # ... and writes it back fused
    fused_model.save_pretrained(tmp_path / "resaved")
    resaved = load_file(tmp_path / "resaved" / "model.safetensors")
    assert "model.layers.0.mlp.experts.gate_up_proj" in resaved
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" not in resaved
    for path in (fused_dir, tmp_path / "resaved"):
        cfg2, loaded = hf.load_hf_dir(str(path))
        assert cfg2 == cfg
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded),
                     jax.device_get(params))
    # export is always the hub's per-expert layout
    hf.save_hf_dir(loaded, cfg, str(tmp_path / "out"))
    assert sorted(load_file(tmp_path / "out" / "model.safetensors")) == sorted(
        load_file(tmp_path / "hub" / "model.safetensors"))


# ----------------------------------------------------------------------------- no torch


def _tiny(**overrides):
    fields = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                  num_layers=3, mlp_only_layers=(1,), scan_layers=False)
    return M.ModelConfig.tiny(V, "qwen3_moe", **{**fields, **overrides})


def _tiny_dir(path, **overrides):
    cfg = _tiny(**overrides)
    params = M.init_params(cfg, jax.random.key(0))
    hf.save_hf_dir(params, cfg, str(path))
    return cfg, params


def _edit(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def test_config_json_both_ways():
    cfg = _tiny(norm_topk_prob=True, decoder_sparse_step=2, num_layers=4, mlp_only_layers=(3,))
    out = hf.config_to_hf(cfg)
    assert out["architectures"] == ["Qwen3MoeForCausalLM"] and out["model_type"] == "qwen3_moe"
    assert (out["num_experts"], out["num_experts_per_tok"], out["moe_intermediate_size"],
            out["decoder_sparse_step"], out["mlp_only_layers"], out["norm_topk_prob"]) == (
        4, 2, 16, 2, [3], True)
    assert hf.config_from_hf(out) == cfg and cfg.sparse_layers == (1,)
    # transformers 5 writes num_experts as num_local_experts (its attribute map)
    local = {**out, "num_local_experts": 4}
    del local["num_experts"]
    assert hf.config_from_hf(local) == cfg
    # Qwen3MoeConfig's defaults: no head_dim field (attention: hidden // heads), dense width
    # 6144, every layer sparse -> scanned layers
    bare = {k: v for k, v in out.items() if k not in (
        "head_dim", "intermediate_size", "norm_topk_prob", "decoder_sparse_step",
        "mlp_only_layers")}
    plain = hf.config_from_hf(bare)
    assert (plain.head_dim, plain.intermediate_size, plain.norm_topk_prob) == (16, 6144, False)
    assert plain.sparse_layers == (0, 1, 2, 3) and plain.scan_layers
    assert not hf.config_from_hf({**bare, "mlp_only_layers": [0]}).scan_layers
    assert hf.config_from_hf({**bare, "mlp_only_layers": [0, 1, 2, 3]}).scan_layers  # all dense


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sharded_export_reloads_bit_exact(tmp_path, dtype):
    cfg = _tiny(param_dtype=dtype)
    params = M.init_params(cfg, jax.random.key(1))
    hf.save_hf_dir(params, cfg, str(tmp_path), max_shard_size=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / "model.safetensors").exists()
    names = set(index["weight_map"])
    assert {f"model.layers.0.mlp.experts.{j}.{p}.weight" for j in range(4)
            for p in ("gate_proj", "up_proj", "down_proj")} <= names
    assert {"model.layers.1.mlp.gate_proj.weight", "model.layers.0.mlp.gate.weight"} <= names
    tensors = {}
    for file in files:
        tensors.update(load_file(tmp_path / file))
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    want = np.asarray(params["layers_0"]["mlp"]["expert_down"][3])
    np.testing.assert_array_equal(tensors["model.layers.0.mlp.experts.3.down_proj.weight"],
                                  want.T)  # [E, F] of expert 3
    cfg2, loaded = hf.load_hf_dir(str(tmp_path), param_dtype=dtype)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(params))
    # one file again: the stale index goes (it would shadow model.safetensors)
    hf.save_hf_dir(params, cfg, str(tmp_path))
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert hf.load_hf_dir(str(tmp_path), param_dtype=dtype)[0] == cfg
    if dtype == "bfloat16":
        assert load_file(tmp_path / "model.safetensors")[
            "model.layers.2.mlp.experts.0.up_proj.weight"].dtype == ml_dtypes.bfloat16


def test_scanned_moe_roundtrip(tmp_path):
    """Every layer sparse: stacked [L, X, ...] expert params export and load back scanned."""
    cfg, params = _tiny_dir(tmp_path, mlp_only_layers=(), scan_layers=True)
    assert params["layers"]["mlp"]["expert_gate"].shape == (3, 4, 64, 16)
    cfg2, loaded = hf.load_hf_dir(str(tmp_path))
    assert cfg2 == cfg and cfg2.scan_layers
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(params))


def test_bad_config_names_the_field(tmp_path):
    _tiny_dir(tmp_path)
    cfg_file = tmp_path / "config.json"
    _edit(tmp_path, num_experts_per_tok=5)
    with pytest.raises(ValueError, match=rf"{cfg_file}: num_experts_per_tok=5 must be in "
                                         r"\[1, num_experts=4\]"):
        hf.load_hf_dir(str(tmp_path))
    _edit(tmp_path, num_experts_per_tok=2, mlp_only_layers=[7])
    with pytest.raises(ValueError, match=rf"{cfg_file}: mlp_only_layers \[7\] are not layers of "
                                         r"a 3-layer model"):
        hf.load_hf_dir(str(tmp_path))
    _edit(tmp_path, mlp_only_layers="1")
    with pytest.raises(ValueError, match=r"mlp_only_layers in .* must be a list"):
        hf.load_hf_dir(str(tmp_path))
    _edit(tmp_path, mlp_only_layers=[1], num_local_experts=8)
    with pytest.raises(ValueError, match=r"num_experts=4 and num_local_experts=8: they must "
                                         r"agree"):
        hf.load_hf_dir(str(tmp_path))
    _edit(tmp_path, num_local_experts=None, num_experts=None)
    with pytest.raises(KeyError, match=rf"{cfg_file} has no 'num_experts' \(or "
                                       r"'num_local_experts'\)"):
        hf.load_hf_dir(str(tmp_path))
    _edit(tmp_path, num_experts=4, moe_intermediate_size=None)
    with pytest.raises(KeyError, match=rf"{cfg_file} has no 'moe_intermediate_size'"):
        hf.load_hf_dir(str(tmp_path))


def test_bad_tensors_name_the_problem(tmp_path):
    _tiny_dir(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    name = "model.layers.2.mlp.experts.3.up_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, file)
    with pytest.raises(KeyError, match=rf"1 tensor\(s\) missing .*\['{name}'\]"):
        hf.load_hf_dir(str(tmp_path))

    save_file({**tensors, name: tensors[name][:, :10]}, file)
    with pytest.raises(ValueError, match=rf"tensor {name} .* shape \(16, 10\), expected "
                                         r"\(16, 64\) \(expert 3 of 4\)"):
        hf.load_hf_dir(str(tmp_path))

    # more experts in the checkpoint than the config says
    extra = {k.replace("experts.3.", "experts.4."): v for k, v in tensors.items()
             if ".experts.3." in k}
    save_file({**tensors, **extra}, file)
    with pytest.raises(ValueError, match=r"tensors the config does not use \(wrong "
                                         r"num_hidden_layers / num_experts / mlp_only_layers.*"
                                         r"model.layers.0.mlp.experts.4.down_proj.weight"):
        hf.load_hf_dir(str(tmp_path))

    # a layer the config makes dense stores experts: its dense MLP is missing
    save_file(tensors, file)
    _edit(tmp_path, mlp_only_layers=[0, 1])
    with pytest.raises(KeyError, match=r"missing .*model.layers.0.mlp.gate_proj.weight"):
        hf.load_hf_dir(str(tmp_path))
    _edit(tmp_path, mlp_only_layers=[1])

    # both layouts in one layer; a fused tensor of the wrong shape
    fused = _fuse(tensors, (0,), 4)
    save_file({**tensors, **{k: v for k, v in fused.items() if "experts.down" in k}}, file)
    with pytest.raises(ValueError, match=r"layer 0 stores its experts both fused .*"
                                         r"and per expert .*one of the two layouts"):
        hf.load_hf_dir(str(tmp_path))
    bad = dict(fused)
    bad["model.layers.0.mlp.experts.gate_up_proj"] = bad[
        "model.layers.0.mlp.experts.gate_up_proj"][:, :16]
    save_file(bad, file)
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.experts.gate_up_proj .* "
                                         r"shape \(4, 16, 64\), expected \(4, 32, 64\)"):
        hf.load_hf_dir(str(tmp_path))
    del fused["model.layers.0.mlp.experts.down_proj"]
    save_file(fused, file)
    with pytest.raises(KeyError, match=r"missing .*model.layers.0.mlp.experts.down_proj"):
        hf.load_hf_dir(str(tmp_path))


def test_bad_max_shard_size(tmp_path):
    cfg = _tiny()
    with pytest.raises(ValueError, match="max_shard_size must be >= 1 byte"):
        hf.save_hf_dir(M.init_params(cfg, jax.random.key(0)), cfg, str(tmp_path),
                       max_shard_size=0)
    assert not os.listdir(tmp_path)


def test_loads_straight_into_a_mesh(tmp_path):
    """Each device gets its slice of the stacked experts (the 'expert' / 'expert_embed' logical
    axes of the rules table), values equal to the unsharded load."""
    from trustrl.infra.sharding import make_mesh
    cfg, params = _tiny_dir(tmp_path)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, loaded = hf.load_hf_dir(str(tmp_path), mesh=mesh)
    want = M.param_shardings(cfg, mesh)
    for name in ("router", "expert_gate", "expert_up", "expert_down"):
        got = loaded["layers_0"]["mlp"][name].sharding
        assert got.spec == want["layers_0"]["mlp"][name].spec, name
    assert "fsdp" in loaded["layers_0"]["mlp"]["expert_gate"].sharding.spec
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(params))


def test_qwen3_30b_a3b_shapes():
    """Qwen3-30B-A3B's architecture (48 layers of 128 experts, 8 per token; the shapes slime's
    and Megatron's scripts use): 30.5B parameters, 3.3B active (its model card), every layer
    sparse so the layers scan, and 3 + 48 * (8 + 1 + 128 * 3) hub tensors."""
    config = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                  vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                  num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                  head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                  norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                  tie_word_embeddings=False, rope_theta=1e6, rms_norm_eps=1e-6,
                  max_position_embeddings=40960, torch_dtype="bfloat16")
    cfg = hf.config_from_hf(config, param_dtype="bfloat16", dtype="bfloat16")
    assert cfg.scan_layers and cfg.sparse_layers == tuple(range(48))
    shapes = M.param_shapes(cfg)
    assert shapes["layers"]["mlp"]["expert_down"].shape == (48, 128, 768, 2048)
    total = sum(x.size for x in jax.tree.leaves(shapes))
    experts = sum(shapes["layers"]["mlp"][n].size for n in ("expert_gate", "expert_up",
                                                             "expert_down"))
    active = total - experts + experts * 8 // 128
    assert abs(total / 30.5e9 - 1) < 0.005 and abs(active / 3.3e9 - 1) < 0.02, (total, active)
    assert len(hf.tensor_map(cfg)) == 3 + 48 * (8 + 1 + 128 * 3)
