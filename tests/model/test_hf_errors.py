"""Damaged Hugging Face directories: load_hf_dir's errors name the file, shard and key."""
import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from trustrl.model import hf
from trustrl.model import transformer as M


HV = 128  # vocabulary of the tiny exported models


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (config, host params, HF dir) of a tiny random model, exported once per module
    (tests damage copies of it: see _tiny_dir)."""
    cache = {}

    def get(family):
        if family not in cache:
            cfg = M.ModelConfig.tiny_shardable(HV, family)
            params = M.init_params(cfg, jax.random.key(0))
            path = tmp_path_factory.mktemp(f"export_{family}")
            hf.save_hf_dir(params, cfg, str(path))
            cache[family] = cfg, jax.device_get(params), path
        return cache[family]
    return get


def _tiny_dir(exported, path, family="qwen2"):
    """A fresh copy of the exported HF dir of ``family`` at ``path``: (config, host params)."""
    cfg, params, src = exported(family)
    shutil.copytree(src, path, dirs_exist_ok=True)
    return cfg, params


def _shard(path, n):
    """Splits path/model.safetensors into n shards + index, named like HF's large exports."""
    tensors = load_file(path / "model.safetensors")
    os.remove(path / "model.safetensors")
    names, weight_map, files = sorted(tensors), {}, []
    for i in range(n):
        file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k] for k in names[i::n]}, path / file)
        weight_map.update({k: file for k in names[i::n]})
        files.append(path / file)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return files


def _edit_config(path, **changes):
    """Rewrites path/config.json; a value of None deletes the key."""
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    return config


@pytest.mark.parametrize("keep_bytes", [4, 20, -100])  # header too small / bad length / data cut
def test_truncated_shard_names_the_file_and_shard(exported, tmp_path, keep_bytes):
    _tiny_dir(exported, tmp_path)
    files = _shard(tmp_path, 9)
    data = files[3].read_bytes()
    files[3].write_bytes(data[:keep_bytes])
    with pytest.raises(ValueError, match=r"cannot read safetensors file .*"
                                         r"model-00004-of-00009\.safetensors \(shard 4 of 9\).*"
                                         r"truncated or corrupt"):
        hf.load_hf_dir(str(tmp_path))


def test_truncated_single_file_names_the_file(exported, tmp_path):
    _tiny_dir(exported, tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(ValueError, match=rf"cannot read safetensors file {file}: .*incomplete"):
        hf.load_hf_dir(str(tmp_path))


def test_tensor_missing_from_its_listed_shard_names_tensor_and_file(exported, tmp_path):
    _tiny_dir(exported, tmp_path)
    files = _shard(tmp_path, 2)
    tensors = load_file(files[1])
    name = sorted(tensors)[0]
    del tensors[name]
    save_file(tensors, files[1])
    with pytest.raises(ValueError, match=rf"tensor {name} from safetensors file .*"
                                         r"model-00002-of-00002\.safetensors \(shard 2 of 2\)"):
        hf.load_hf_dir(str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_missing_architectures_falls_back_to_model_type(exported, tmp_path, family):
    cfg, params = _tiny_dir(exported, tmp_path, family)
    written = _edit_config(tmp_path, architectures=None)
    assert written["model_type"] == family
    cfg2, loaded = hf.load_hf_dir(str(tmp_path))
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(params))


def test_unsupported_model_type_lists_the_supported_ones(exported, tmp_path):
    _tiny_dir(exported, tmp_path)
    _edit_config(tmp_path, architectures=None, model_type="gpt2")
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2' \(no 'architectures' "
                                         r"given\) in .*config\.json; supported: "
                                         r".*LlamaForCausalLM.*Qwen3ForCausalLM.*"
                                         r"model_type \['llama', 'qwen2', 'qwen3', 'qwen3_moe'\]"):
        hf.load_hf_dir(str(tmp_path))
    _edit_config(tmp_path, model_type=None)
    with pytest.raises(ValueError, match="unsupported model_type None"):
        hf.load_hf_dir(str(tmp_path))


def _llama3_dir(exported, path, **rope):
    """The llama export with llama3 RoPE scaling ``rope`` written in both config forms (the
    tensors do not depend on RoPE)."""
    _tiny_dir(exported, path, "llama")
    rope = {"rope_type": "llama3", **rope}
    _edit_config(path, rope_theta=5e5, max_position_embeddings=64, rope_scaling=rope,
                 rope_parameters={**rope, "rope_theta": 5e5})


LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)


def test_llama3_rope_without_original_max_positions_matches_transformers(exported, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    _llama3_dir(exported, tmp_path, **LLAMA3)  # no original_max_position_embeddings

    cfg, _ = hf.load_hf_dir(str(tmp_path))
    assert cfg.rope_scaling.original_max_position_embeddings == 64  # = max_position_embeddings
    ref_cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    assert ref_cfg.rope_parameters["original_max_position_embeddings"] == 64
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](ref_cfg, "cpu")
    ours = M.rope_inv_freq(cfg)
    np.testing.assert_allclose(ours, want.numpy(), rtol=1e-6)
    # the fallback matters: no scaling, or another original length, give other frequencies
    assert np.abs(ours - M.rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))).max() > 1e-3
    other = M.Llama3RopeScaling(**LLAMA3, original_max_position_embeddings=16)
    assert np.abs(ours - M.rope_inv_freq(dataclasses.replace(cfg, rope_scaling=other))).max() > 0

    # neither key given: transformers would use its class default, which we do not guess
    _edit_config(tmp_path, max_position_embeddings=None)
    with pytest.raises(KeyError, match=r"llama3 .* in .*config\.json need "
                                       r"original_max_position_embeddings.*max_position_embed"):
        hf.load_hf_dir(str(tmp_path))


def test_llama3_rope_missing_factor_names_key_and_file(exported, tmp_path):
    _llama3_dir(exported, tmp_path, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=16)
    with pytest.raises(KeyError, match=r"llama3 .* in .*config\.json lack \['factor'\]"):
        hf.load_hf_dir(str(tmp_path))


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "intermediate_size",
                                 "num_hidden_layers", "num_attention_heads"])
def test_missing_required_config_key_names_key_and_file(exported, tmp_path, key):
    _tiny_dir(exported, tmp_path)
    _edit_config(tmp_path, **{key: None})
    with pytest.raises(KeyError, match=rf"{tmp_path / 'config.json'} has no '{key}'"):
        hf.load_hf_dir(str(tmp_path))


def test_missing_directory_config_and_weights(exported, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'nowhere'} does not exist"):
        hf.load_hf_dir(str(tmp_path / "nowhere"))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'a_file'} is not a directory"):
        hf.load_hf_dir(str(tmp_path / "a_file"))
    d = tmp_path / "model"
    _tiny_dir(exported, d)
    os.remove(d / "config.json")
    with pytest.raises(FileNotFoundError, match=rf"no Hugging Face config at {d / 'config.json'}"):
        hf.load_hf_dir(str(d))
    _tiny_dir(exported, d)
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no weights in .*model\.safetensors or .*"
                                                r"index\.json \(found \['pytorch_model\.bin'\]"):
        hf.load_hf_dir(str(d))


def test_malformed_json_names_the_file(exported, tmp_path):
    _tiny_dir(exported, tmp_path)
    text = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(text[:-5])
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'} is not valid JSON"):
        hf.load_hf_dir(str(tmp_path))
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        hf.load_hf_dir(str(tmp_path))
    (tmp_path / "config.json").write_text(text)
    _shard(tmp_path, 2)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=r"index\.json has no 'weight_map'"):
        hf.load_hf_dir(str(tmp_path))
