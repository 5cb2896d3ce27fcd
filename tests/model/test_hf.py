"""Hugging Face import / export: logit parity with transformers (torch CPU) and clear errors."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from trustrl.model import hf
from trustrl.model import transformer as M
from trustrl.infra.sharding import make_mesh

V = 128
_logits = jax.jit(M.forward_logits, static_argnums=1)

# Tiny random configs, one per family, each exercising its specific feature.
HF_CONFIGS = {
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=16,
                  tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                             "rope_theta": 1e6}),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                  tie_word_embeddings=False, rope_theta=10000.0),
    # original_max_position_embeddings small, so the llama3 scaling changes frequencies in use
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama",
                  tie_word_embeddings=False, rope_parameters={
                      "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}),
}
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
              max_position_embeddings=64)


def _hf_model(family, dtype="float32"):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(**{**COMMON, **HF_CONFIGS[family]})
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # random init has unit norms and zero biases: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.05))
    return model.to(getattr(torch, dtype)).eval()


def _hf_logits(model, tokens):
    import torch
    with torch.no_grad():
        out = model(torch.tensor(np.array(tokens), dtype=torch.long)).logits
    return out.float().numpy()


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 24)), jnp.int32)


def _ours(params, cfg, tokens):
    ones = jnp.ones_like(tokens)
    return np.asarray(_logits(params, cfg, tokens, M.positions_from_mask(ones), ones))


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_fp32_parity_and_export_roundtrip(family, tokens, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _hf_model(family)
    model.save_pretrained(tmp_path / "hf")
    cfg, params = hf.load_hf_dir(str(tmp_path / "hf"))
    assert cfg.family == family and cfg.num_layers == 2
    assert cfg.tie_word_embeddings == (family == "qwen3") and ("lm_head" in params) != (
        family == "qwen3")
    if family == "llama":
        assert cfg.rope_scaling.original_max_position_embeddings == 16
    want = _hf_logits(model, tokens)
    got = _ours(params, cfg, tokens)
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()

    # export -> transformers: identical tensors, identical logits
    hf.save_hf_dir(params, cfg, str(tmp_path / "out"))
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager").eval()
    ref_state, back_state = model.state_dict(), back.state_dict()
    assert sorted(ref_state) == sorted(back_state)
    for name, tensor in ref_state.items():
        np.testing.assert_array_equal(back_state[name].numpy(), tensor.numpy(), err_msg=name)
    assert np.abs(_hf_logits(back, tokens) - got).max() <= 1e-4


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_bf16_parity(family, tokens, tmp_path):
    """bf16 has ~3 significant digits: we require trustrl-bf16 to be no further from the fp32
    reference than 1.5x transformers-bf16 is (plus 0.02), measured on logits of size ~1."""
    model = _hf_model(family)
    model.save_pretrained(tmp_path / "hf")
    ref = _hf_logits(model, tokens)
    hf_err = np.abs(_hf_logits(_hf_model(family, "bfloat16"), tokens) - ref).max()
    cfg, params = hf.load_hf_dir(str(tmp_path / "hf"), param_dtype="bfloat16", dtype="bfloat16")
    assert params["embedding"].dtype == jnp.bfloat16
    our_err = np.abs(_ours(params, cfg, tokens) - ref).max()
    assert our_err <= 1.5 * hf_err + 0.02, (our_err, hf_err)
    assert our_err < 0.1


def _tiny_dir(path, family="qwen2", **overrides):
    cfg = M.ModelConfig.tiny_shardable(V, family, **overrides)
    params = M.init_params(cfg, jax.random.key(0))
    hf.save_hf_dir(params, cfg, str(path))
    return cfg, params


def test_sharded_index_loads_straight_into_a_mesh(tmp_path):
    cfg, params = _tiny_dir(tmp_path)
    # split model.safetensors into two shards with an index, like large checkpoints
    tensors = load_file(tmp_path / "model.safetensors")
    os.remove(tmp_path / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, tmp_path / file)
        weight_map.update({n: file for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    cfg2, loaded = hf.load_hf_dir(str(tmp_path), mesh=mesh)
    assert cfg2 == cfg
    assert loaded["layers"]["attn"]["q_proj"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert loaded["embedding"].sharding.spec == P("tensor", "fsdp")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(params))


def test_rope_config_forms_agree():
    base = {**COMMON, "architectures": ["LlamaForCausalLM"]}
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    old = hf.config_from_hf({**base, "rope_theta": 5e5,
                             "rope_scaling": {"rope_type": "llama3", **scaling}})
    new = hf.config_from_hf({**base, "rope_parameters": {"rope_type": "llama3",
                                                         "rope_theta": 5e5, **scaling}})
    assert old == new and old.rope_theta == 5e5 and old.rope_scaling.factor == 8.0
    assert hf.config_from_hf(hf.config_to_hf(new)) == new
    plain = hf.config_from_hf({**base, "rope_theta": 1e4})
    assert plain.rope_scaling is None and plain.head_dim == 16
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        hf.config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere" / "config.json")):
        hf.load_hf_dir(str(tmp_path / "nowhere"))
    _tiny_dir(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json"):
        hf.load_hf_dir(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "part-1.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="part-1.safetensors is listed"):
        hf.load_hf_dir(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    _tiny_dir(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel.*supported: "
                                         ".*LlamaForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM"):
        hf.load_hf_dir(str(tmp_path))


def test_wrong_shape_and_missing_tensor(tmp_path):
    _tiny_dir(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:, :10]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"tensor {name} .* shape \(128, 10\), "
                                         r"expected \(128, 64\)"):
        hf.load_hf_dir(str(tmp_path))
    del tensors[name], tensors["model.layers.0.self_attn.q_proj.bias"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=r"2 tensor\(s\) missing.*model.layers.0.self_attn.q_proj"
                                       r".bias.*model.layers.1.mlp.up_proj.weight"):
        hf.load_hf_dir(str(tmp_path))


@pytest.mark.slow
def test_smollm2_parity(smollm2_dir):
    """Real SmolLM2-135M weights (conftest.py builds them with trustrl.tools.get_smollm2)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = str(smollm2_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()
    cfg, params = hf.load_hf_dir(path)
    assert (cfg.num_layers, cfg.hidden_size, cfg.tie_word_embeddings) == (30, 576, True)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 32)))
    diff = np.abs(_ours(params, cfg, tokens) - _hf_logits(model, tokens)).max()
    assert diff <= 1e-3, diff  # 30 layers and logits of size ~20: a little looser than 1e-4
