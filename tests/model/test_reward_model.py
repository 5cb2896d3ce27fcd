"""Reward models (trustrl.model.reward_model): score parity with transformers' sequence
classifiers (torch CPU), export / import, sharding, bad inputs, reward models from a policy."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from trustrl.infra.sharding import make_mesh
from trustrl.model import hf
from trustrl.model import reward_model as rm
from trustrl.model import transformer as M

V, PAD = 96, 7
_score = jax.jit(rm.score, static_argnums=1)

# Tiny random sequence classifiers, one per family, each with its specific feature (as
# test_hf.py's causal LMs).
HF_CONFIGS = {
    "llama": dict(architectures=["LlamaForSequenceClassification"], model_type="llama",
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16}),
    "qwen2": dict(architectures=["Qwen2ForSequenceClassification"], model_type="qwen2"),
    "qwen3": dict(architectures=["Qwen3ForSequenceClassification"], model_type="qwen3",
                  head_dim=16),
    "qwen3_moe": dict(architectures=["Qwen3MoeForSequenceClassification"],
                      model_type="qwen3_moe", head_dim=16, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=32, norm_topk_prob=True),
}
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
              max_position_embeddings=64, num_labels=1, pad_token_id=PAD)


def _hf_model(family, **overrides):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(**{**COMMON, **HF_CONFIGS[family], **overrides})
    model = transformers.AutoModelForSequenceClassification.from_config(
        cfg, attn_implementation="eager")
    with torch.no_grad():  # random init has unit norms and zero biases: perturb everything
        for name, p in model.named_parameters():
            scale = 0.3 if name == "score.weight" else 0.2 if p.ndim == 1 else 0.05
            p.add_(torch.randn_like(p) * scale)  # (the score: rewards of size ~1)
            if name.endswith("mlp.gate.weight"):  # MoE routers up: no near-tied experts
                p.mul_(4.0)
    return model.eval()


def _hf_scores(model, tokens, mask=None):
    import torch
    with torch.no_grad():
        out = model(torch.tensor(np.asarray(tokens), dtype=torch.long),
                    attention_mask=None if mask is None else torch.tensor(np.asarray(mask)))
    return out.logits[:, 0].float().numpy()


def _ours(params, config, tokens, valid):
    tokens, valid = jnp.asarray(tokens, jnp.int32), jnp.asarray(valid, jnp.int32)
    return np.asarray(_score(params, config, tokens, M.positions_from_mask(valid), valid))


def _batch(lengths, width, side, rng):
    """Rows of the given lengths (tokens other than PAD), padded with PAD on ``side``."""
    tokens = np.full((len(lengths), width), PAD, np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for i, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        tokens[i, cols] = rng.choice([t for t in range(V) if t != PAD], n)
        mask[i, cols] = 1
    return tokens, mask


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_score_parity_export_and_roundtrip(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _hf_model(family)
    model.save_pretrained(tmp_path / "hf")
    config, params = rm.load_hf_dir(str(tmp_path / "hf"), param_dtype="float32", dtype="float32")
    assert config.architecture == HF_CONFIGS[family]["architectures"][0]
    assert (config.model.family, config.pad_token_id, config.model.num_layers) == (family, PAD, 2)
    assert "lm_head" not in params["model"] and params["score"].shape == (64, 1)
    rng = np.random.default_rng(0)
    for side in ("right", "left"):  # HF: attention_mask (its position ids stay 0..T-1: RoPE
        tokens, mask = _batch([12, 7, 3], 12, side, rng)  # is shift-invariant), ours: positions
        want = _hf_scores(model, tokens, mask)  # from the mask
        got = _ours(params, config, tokens, mask)
        assert got.dtype == np.float32 and np.abs(want).max() > 0.3  # rewards of size ~1
        assert np.abs(got - want).max() <= 1e-4, (side, got, want)

    # export -> transformers: the same tensors and scores; -> trustrl: bitwise the same params
    rm.save_hf_dir(params, config, str(tmp_path / "out"))
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["id2label"] == {"0": "LABEL_0"} and saved["pad_token_id"] == PAD
    back = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out", attn_implementation="eager").eval()
    assert back.config.num_labels == 1 and back.config.pad_token_id == PAD
    ref_state, back_state = model.state_dict(), back.state_dict()
    assert sorted(ref_state) == sorted(back_state)
    for name, tensor in ref_state.items():
        np.testing.assert_array_equal(back_state[name].numpy(), tensor.numpy(), err_msg=name)
    assert np.abs(_hf_scores(back, tokens, mask) - got).max() <= 1e-4
    config2, params2 = rm.load_hf_dir(str(tmp_path / "out"), param_dtype="float32",
                                      dtype="float32")
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params2), jax.device_get(params))


def test_pad_token_pooling_as_transformers(tmp_path):
    """pad == eos: a row whose content ends with the pad token pools at the token before it (the
    rightmost non-pad token), as transformers does; with pad_token_id None trustrl pools at the
    last valid token (transformers takes column -1, for one row only)."""
    model = _hf_model("qwen3")
    model.save_pretrained(tmp_path / "hf")
    config, params = rm.load_hf_dir(str(tmp_path / "hf"), param_dtype="float32", dtype="float32")
    tokens, mask = _batch([6, 4, 3], 8, "right", np.random.default_rng(1))
    tokens[0, 5] = PAD  # row 0's content ends with the pad (eos) token ...
    tokens[1, 2:4] = PAD  # ... row 1's with two of them
    idx = np.asarray(rm.pooled_index(jnp.asarray(tokens), jnp.asarray(mask), PAD))
    assert idx.tolist() == [4, 1, 2]
    want = _hf_scores(model, tokens, mask)
    assert np.abs(_ours(params, config, tokens, mask) - want).max() <= 1e-4
    # ... the same as scoring the content without its trailing pad tokens
    assert np.abs(_ours(params, config, tokens[:1, :5], mask[:1, :5]) - want[0]).max() <= 1e-4

    # pad_token_id None: the last valid token of each row, whatever it is
    nopad = rm.RewardModelConfig(config.model, config.architecture, None)
    assert np.asarray(rm.pooled_index(jnp.asarray(tokens), jnp.asarray(mask))).tolist() == [
        5, 3, 2]
    got = _ours(params, nopad, tokens, mask)
    model.config.pad_token_id = None
    for i, n in enumerate([6, 4, 3]):
        assert abs(got[i] - _hf_scores(model, tokens[i:i + 1, :n])[0]) <= 1e-4


def _tiny_rm(family="llama", pad=PAD, **overrides):
    model = M.ModelConfig.tiny_shardable(V, family, **overrides)
    config = rm.RewardModelConfig(dataclasses.replace(model, tie_word_embeddings=True),
                                  next(a for a, f in rm.ARCHITECTURES.items() if f == family),
                                  pad)
    return config, rm.init_params(config, jax.random.key(0))


def test_sharded_load_and_program_equal_unsharded(tmp_path):
    config, params = _tiny_rm("qwen2")
    rm.save_hf_dir(params, config, str(tmp_path))
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    config2, sharded = rm.load_hf_dir(str(tmp_path), mesh=mesh, param_dtype="float32",
                                      dtype="float32")
    assert config2 == config
    q = sharded["model"]["layers"]["attn"]["q_proj"]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert sharded["score"].sharding.spec == P()
    tokens, mask = _batch([9, 4, 1, 7], 9, "left", np.random.default_rng(2))
    tokens, mask = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)
    positions = M.positions_from_mask(mask)
    want = np.asarray(rm.score_program(config)(params, tokens, positions, mask))
    with jax.set_mesh(mesh):
        out = rm.score_program(config, mesh)(sharded, tokens, positions, mask)
    assert out.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5)


def test_bf16_by_default(tmp_path):
    config, params = _tiny_rm("llama", num_layers=1)
    rm.save_hf_dir(params, config, str(tmp_path))
    config16, params16 = rm.load_hf_dir(str(tmp_path))
    assert (config16.model.param_dtype, config16.model.dtype) == ("bfloat16", "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
    tokens, mask = _batch([5, 3], 5, "right", np.random.default_rng(3))
    got, want = _ours(params16, config16, tokens, mask), _ours(params, config, tokens, mask)
    assert got.dtype == np.float32
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max() + 1e-3, (got, want)


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_bad_inputs_name_the_file_and_field(tmp_path):
    # a causal LM directory: its config.json ...
    policy_cfg = M.ModelConfig.tiny(V)
    hf.save_hf_dir(M.init_params(policy_cfg, jax.random.key(0)), policy_cfg, str(tmp_path / "lm"))
    with pytest.raises(ValueError, match=r"lm/config.json: architectures \['LlamaForCausalLM'\] "
                                         r"is a causal LM.*ForSequenceClassification"):
        rm.load_hf_dir(str(tmp_path / "lm"))
    # ... and its weights (lm_head, no score) when the config claims a sequence classifier
    _edit_config(tmp_path / "lm", architectures=["LlamaForSequenceClassification"], num_labels=1)
    with pytest.raises(ValueError, match=r"lm/model.safetensors holds lm_head.weight and no "
                                         r"score.weight: a causal LM"):
        rm.load_hf_dir(str(tmp_path / "lm"))

    path = tmp_path / "rm"
    config, params = _tiny_rm("llama")
    rm.save_hf_dir(params, config, str(path))
    _edit_config(path, id2label={"0": "bad", "1": "good"}, label2id={"bad": 0, "good": 1})
    with pytest.raises(ValueError, match=r"rm/config.json: num_labels is 2 \(the length of "
                                         r"'id2label'\)"):
        rm.load_hf_dir(str(path))
    _edit_config(path, num_labels=3)  # transformers: num_labels wins over id2label
    with pytest.raises(ValueError, match=r"rm/config.json: num_labels is 3 \('num_labels'\)"):
        rm.load_hf_dir(str(path))
    _edit_config(path, num_labels=1, pad_token_id="<pad>")
    with pytest.raises(ValueError, match=r"rm/config.json: pad_token_id must be an integer"):
        rm.load_hf_dir(str(path))
    _edit_config(path, pad_token_id=PAD)
    rm.load_hf_dir(str(path))  # (num_labels 1 over a 2-entry id2label, as transformers reads)

    tensors = load_file(path / "model.safetensors")
    save_file({**tensors, "score.weight": np.zeros((2, 64), np.float32)},
              path / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor score.weight in .*rm/model.safetensors has "
                                         r"shape \(2, 64\), expected \(1, 64\)"):
        rm.load_hf_dir(str(path))
    del tensors["score.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(KeyError, match=r"rm/model.safetensors has no score.weight"):
        rm.load_hf_dir(str(path))


def test_num_labels_read_as_transformers_reads_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    base = dict(COMMON, **HF_CONFIGS["qwen2"])
    del base["num_labels"]
    cases = [{}, {"num_labels": 1}, {"id2label": {"0": "LABEL_0"}},
             {"id2label": {"0": "a", "1": "b"}}, {"id2label": {"0": "a", "1": "b"},
                                                  "num_labels": 1},
             {"id2label": {"0": "a"}, "num_labels": 2}]
    for i, extra in enumerate(cases):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "config.json").write_text(json.dumps({**base, **extra}))
        want = transformers.AutoConfig.from_pretrained(tmp_path / str(i)).num_labels
        assert rm.num_labels({**base, **extra})[0] == want, extra


@pytest.mark.parametrize("tied", [False, True])
def test_from_policy(tied):
    """A reward model on a trustrl policy's trunk: [B] finite scores that depend only on each
    row's valid tokens (not on what padding slots hold, nor on the other rows)."""
    policy_cfg = M.ModelConfig.tiny(V, tie_word_embeddings=tied)
    policy = M.init_params(policy_cfg, jax.random.key(1))
    config, params = rm.from_policy(policy_cfg, policy, jax.random.key(2), pad_token_id=PAD)
    assert config.architecture == "LlamaForSequenceClassification"
    assert "lm_head" not in params["model"] and params["score"].shape == (64, 1)
    assert params["model"]["embedding"] is policy["embedding"]
    assert 0.01 < float(jnp.std(params["score"])) < 0.03  # N(0, 0.02^2)
    tokens, mask = _batch([8, 5, 2], 8, "left", np.random.default_rng(4))
    got = _ours(params, config, tokens, mask)
    assert got.shape == (3,) and np.isfinite(got).all()
    garbage = np.where(mask == 1, tokens, np.random.default_rng(5).integers(0, V, tokens.shape))
    np.testing.assert_allclose(_ours(params, config, garbage, mask), got, atol=1e-6)
    for i, n in enumerate([8, 5, 2]):  # each row alone, unpadded
        alone = _ours(params, config, tokens[i:i + 1, -n:], mask[i:i + 1, -n:])
        np.testing.assert_allclose(alone, got[i:i + 1], atol=1e-5)
    with pytest.raises(ValueError, match="do not match model_cfg"):
        rm.from_policy(dataclasses.replace(policy_cfg, num_layers=3, scan_layers=False), policy,
                       jax.random.key(2))
