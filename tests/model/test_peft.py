"""PEFT adapter directories (trustrl.model.peft): PEFT (0.21, torch CPU) loads trustrl's adapters
onto the transformers base and gets trustrl's logits; adapters round-trip bitwise; PEFT's own
adapters load; the merged model reloads in transformers; mismatched adapters are refused."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustrl.infra.sharding import make_mesh
from trustrl.model import hf, lora, peft
from trustrl.model import transformer as M

V = 96
TARGETS = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
HF_CONFIGS = {
    "qwen3": dict(model_type="qwen3", head_dim=8, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "llama": dict(model_type="llama", tie_word_embeddings=False, rope_theta=10000.0),
}
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
              max_position_embeddings=64)
_logits = jax.jit(M.forward_logits, static_argnums=1)


def _torch_model(family):
    torch = pytest.importorskip("torch")  # before peft: the 3.12 leg counts torch skips
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(**{**COMMON, **HF_CONFIGS[family]})
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # random init has unit norms: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.05))
    return model.float().eval()


def _batch():
    """A left-padded batch: row 1 starts with 5 pad tokens."""
    tokens = np.random.default_rng(0).integers(0, V, (2, 12)).astype(np.int32)
    valid = np.ones_like(tokens, bool)
    valid[1, :5] = False
    return tokens, valid


def _torch_logits(model, tokens, valid):
    import torch
    pos = np.asarray(M.positions_from_mask(jnp.asarray(valid)))
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(valid, dtype=torch.long),
                    position_ids=torch.tensor(pos, dtype=torch.long)).logits
    return out.float().numpy()[valid]


def _ours(params, cfg, tokens, valid):
    t, v = jnp.asarray(tokens), jnp.asarray(valid)
    return np.asarray(_logits(params, cfg, t, M.positions_from_mask(v), v))[valid]


def _with_lora(cfg, targets=TARGETS, rank=4, alpha=8.0, **kw):
    return dataclasses.replace(cfg, lora_rank=rank, lora_alpha=alpha, lora_targets=targets, **kw)


def _random_adapters(cfg, seed=1):
    """Non-zero A and B (a fresh adapter's B is zero: it would test nothing)."""
    shapes = lora.split(M.param_shapes(cfg))[1]
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, s.shape, jnp.float32)
                                     for k, s in zip(keys, leaves)])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_peft_loads_our_adapters_with_our_logits_and_the_merged_export_reloads(family, tmp_path):
    model = _torch_model(family)
    peft_lib = pytest.importorskip("peft")
    import transformers
    model.save_pretrained(tmp_path / "base")
    base_cfg, base = hf.load_hf_dir(str(tmp_path / "base"))
    cfg = _with_lora(base_cfg)
    adapters = _random_adapters(cfg)
    params = lora.combine(base, adapters)
    tokens, valid = _batch()
    ours = _ours(params, cfg, tokens, valid)
    assert np.abs(ours - _ours(base, base_cfg, tokens, valid)).max() > 1e-2  # adapters matter

    peft.save_adapters(adapters, cfg, str(tmp_path / "adapter"), str(tmp_path / "base"))
    written = json.loads((tmp_path / "adapter" / peft.CONFIG_FILE).read_text())
    reference = peft_lib.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS),
                                    task_type="CAUSAL_LM", lora_dropout=0.0).to_dict()
    for key, value in written.items():  # every field we write has PEFT's value for it
        want = reference[key]
        if key == "target_modules":
            value, want = set(value), set(want)
        if key in ("base_model_name_or_path", "inference_mode"):
            continue
        assert value == want, (key, value, want)
    assert written["base_model_name_or_path"] == str(tmp_path / "base")

    wrapped = peft_lib.PeftModel.from_pretrained(model, str(tmp_path / "adapter")).eval()
    theirs = _torch_logits(wrapped, tokens, valid)
    assert np.abs(theirs - ours).max() <= 1e-4, np.abs(theirs - ours).max()

    # merged: W + s A @ B as a plain HF directory, reloaded by transformers
    merged, merged_cfg = lora.merge(params, cfg)
    hf.save_hf_dir(merged, merged_cfg, str(tmp_path / "merged"))
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", attn_implementation="eager").eval()
    got = _torch_logits(back, tokens, valid)
    assert np.abs(got - ours).max() <= 1e-4, np.abs(got - ours).max()


def test_adapters_peft_writes_load_with_peft_logits(tmp_path):
    """The other direction: an adapter PEFT itself made and saved (random, non-zero B) loads
    into trustrl (scanned) and gives PEFT's logits."""
    torch = pytest.importorskip("torch")
    model = _torch_model("qwen3")
    peft_lib = pytest.importorskip("peft")
    model.save_pretrained(tmp_path / "base")
    conf = peft_lib.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj",
                                                                  "gate_proj", "down_proj"],
                               task_type="CAUSAL_LM", lora_dropout=0.0)
    wrapped = peft_lib.get_peft_model(model, conf)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    wrapped.save_pretrained(tmp_path / "adapter")
    wrapped.eval()
    tokens, valid = _batch()
    theirs = _torch_logits(wrapped, tokens, valid)

    base_cfg, base = hf.load_hf_dir(str(tmp_path / "base"))
    cfg = _with_lora(base_cfg, targets=("gate_proj", "k_proj", "o_proj", "down_proj"))
    adapters = peft.load_adapters(str(tmp_path / "adapter"), cfg)
    ours = _ours(lora.combine(base, adapters), cfg, tokens, valid)
    assert np.abs(theirs - ours).max() <= 1e-4, np.abs(theirs - ours).max()


@pytest.mark.parametrize("scan", [True, False])
def test_save_then_load_is_bitwise_and_placed_with_the_shardings(scan, tmp_path):
    cfg = _with_lora(M.ModelConfig.tiny_shardable(V, "qwen3", num_layers=2, scan_layers=scan),
                     targets=tuple(lora.TARGETS))
    adapters = _random_adapters(cfg)
    peft.save_adapters(adapters, cfg, str(tmp_path))
    mesh = make_mesh(dict(data=2, fsdp=1, tensor=4), jax.devices()[:8])
    shardings = lora.split(M.param_shardings(cfg, mesh))[1]
    back = peft.load_adapters(str(tmp_path), cfg, shardings=shardings)
    assert jax.tree.structure(back) == jax.tree.structure(adapters)
    for x, y, s in zip(jax.tree.leaves(adapters), jax.tree.leaves(back),
                       jax.tree.leaves(shardings)):
        assert y.dtype == jnp.float32 and y.sharding == s
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    # the file does not depend on the layout: the other layout reads it too
    other = dataclasses.replace(cfg, scan_layers=not scan)
    flat = peft.load_adapters(str(tmp_path), other)
    a = M.unstack_layers(adapters, cfg) if scan else M.unstack_layers(flat, other)
    b = M.unstack_layers(flat, other) if scan else adapters
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _edit(path, **fields):
    file = path / peft.CONFIG_FILE
    config = json.loads(file.read_text())
    config.update(fields)
    file.write_text(json.dumps(config))


@pytest.mark.parametrize("fields,needle", [
    (dict(r=8), "r=8 but model.lora.rank=4"),
    (dict(lora_alpha=16), "lora_alpha=16 but model.lora.alpha=8.0"),
    (dict(target_modules=["q_proj", "v_proj"]),
     "target_modules=['q_proj', 'v_proj'] but model.lora.targets=('q_proj', 'o_proj')"),
    (dict(target_modules=["q_proj", "embed_tokens"]), "target_modules has ['embed_tokens']"),
    (dict(use_rslora=True), "use_rslora=true"),
    (dict(use_dora=True), "use_dora=True is not supported"),
    (dict(peft_type="IA3"), "peft_type='IA3'"),
    (dict(rank_pattern={"q_proj": 2}), "rank_pattern"),
])
def test_mismatched_adapter_configs_are_refused_naming_the_field(tmp_path, fields, needle):
    cfg = _with_lora(M.ModelConfig.tiny(V), targets=("q_proj", "o_proj"))
    peft.save_adapters(_random_adapters(cfg), cfg, str(tmp_path))
    _edit(tmp_path, **fields)
    with pytest.raises(ValueError, match=None) as e:
        peft.load_adapters(str(tmp_path), cfg)
    assert needle in str(e.value), str(e.value)


def test_adapters_of_another_model_are_refused(tmp_path):
    cfg = _with_lora(M.ModelConfig.tiny(V), targets=("q_proj", "o_proj"))
    peft.save_adapters(_random_adapters(cfg), cfg, str(tmp_path))
    fewer = dataclasses.replace(cfg, num_layers=1)
    with pytest.raises(ValueError, match=r"adapts layers up to 1 \(2 layers\) but the model has "
                                         r"model.num_layers=1"):
        peft.load_adapters(str(tmp_path), fewer)
    more = dataclasses.replace(cfg, num_layers=3)
    with pytest.raises(ValueError, match=r"lacks 4 of the model's adapter tensors .*layers.2"):
        peft.load_adapters(str(tmp_path), more)
    wider = dataclasses.replace(cfg, hidden_size=32)
    with pytest.raises(ValueError, match=r"o_proj.lora_B.weight has shape \(64, 4\), expected "
                                         r"\(32, 4\)"):
        peft.load_adapters(str(tmp_path), wider)
    with pytest.raises(ValueError, match="model.lora.rank=0"):
        peft.load_adapters(str(tmp_path), lora.base_config(cfg))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        peft.load_adapters(str(tmp_path / "nope"), cfg)


def test_a_mixture_of_experts_exports_its_attention_adapters_and_refuses_expert_ones(tmp_path):
    """Attention adapters of a MoE save / load as PEFT's; MLP targets adapt the experts (one
    adapter per expert), which the PEFT format here does not hold: refused, naming the way out."""
    cfg = M.ModelConfig.tiny(V, "qwen3_moe", num_layers=4, num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=16, mlp_only_layers=(0, 2), scan_layers=False,
                             lora_rank=2, lora_alpha=4.0, lora_targets=("q_proj", "down_proj"))
    with pytest.raises(ValueError, match=r"adapt the experts .* --format=merged"):
        peft.save_adapters(M.init_adapters(cfg, jax.random.key(0)), cfg, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="adapt the experts"):
        peft.load_adapters(str(tmp_path / "x"), cfg)
    attn = dataclasses.replace(cfg, lora_targets=("q_proj",))
    assert peft.target_modules(attn) == ["q_proj"]
    adapters = M.init_adapters(attn, jax.random.key(0))
    peft.save_adapters(adapters, attn, str(tmp_path / "a"))
    back = peft.load_adapters(str(tmp_path / "a"), attn)
    jax.tree.map(np.testing.assert_array_equal, back, jax.device_get(adapters))
