"""Hugging Face checkpoint directories <-> trustrl parameters (Llama, Qwen2, Qwen3).

    config, params = hf.load_hf_dir("/path/to/Qwen3-0.6B", mesh=mesh)   # sharded on load
    hf.save_hf_dir(params, config, "/tmp/out")  # transformers.AutoModelForCausalLM loads it

Loading reads ``config.json`` and ``model.safetensors`` (or the shards listed in
``model.safetensors.index.json``) one tensor at a time (memory-mapped), converts it to trustrl's
layout and places it with its ``NamedSharding`` via ``jax.make_array_from_callback``: each device
(and each host, multi-host) receives only its own slice; the whole model never sits on one device.

Layout: Hugging Face stores Linear weights as [out, in]; trustrl stores kernels as [in, out] with
the head axes split out (q_proj [E, H, D], o_proj [H, D, E]) so they can carry logical axis names.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from trustrl.infra import sharding as sharding_lib
from trustrl.model.transformer import (
    Llama3RopeScaling, ModelConfig, param_shapes, param_shardings, stack_layers, unrolled_config,
    unstack_layers)

# architecture name in config.json -> (model family, model_type)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", "llama"),
    "Qwen2ForCausalLM": ("qwen2", "qwen2"),
    "Qwen3ForCausalLM": ("qwen3", "qwen3"),
}
# Defaults of the transformers config classes for fields a config.json may omit.
_HEAD_DIM_DEFAULT = {"qwen3": 128}
_NON_WEIGHT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt")
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


# ----------------------------------------------------------------------------- config.json


def _architecture(hf: dict, source: str) -> str:
    """The supported architecture of ``hf``: from ``architectures``, or, when that is absent,
    from ``model_type`` (as transformers' Auto classes do; they never read ``architectures``)."""
    archs = hf.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None and not archs:
        by_type = {mt: a for a, (_, mt) in ARCHITECTURES.items()}
        arch = by_type.get(hf.get("model_type"))
    if arch is None:
        what = (f"architecture {archs!r}" if archs else
                f"model_type {hf.get('model_type')!r} (no 'architectures' given)")
        raise ValueError(f"unsupported {what} in {source}; supported: {sorted(ARCHITECTURES)} "
                         f"(model_type {sorted(mt for _, mt in ARCHITECTURES.values())})")
    return arch


def _required(hf: dict, key: str, source: str):
    if hf.get(key) is None:
        raise KeyError(f"{source} has no {key!r}, which the model needs")
    return hf[key]


def config_from_hf(hf: dict, *, param_dtype="float32", dtype="float32",
                   remat=ModelConfig.remat, source: str = "config.json") -> ModelConfig:
    """ModelConfig from a parsed config.json. Unsupported variants fail with the reason;
    errors name ``source`` (the file) and the key."""
    arch = _architecture(hf, source)
    family = ARCHITECTURES[arch][0]
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError(f"{arch} with attention_bias / mlp_bias is not supported")
    if hf.get("use_sliding_window"):
        raise ValueError(f"{arch} with use_sliding_window=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")

    # RoPE: the older top-level rope_theta (+ rope_scaling) or transformers 5's rope_parameters.
    rope = dict(hf.get("rope_parameters") or {})
    rope.update(hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        scaling = None
    elif rope_type == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in rope]
        if missing:
            raise KeyError(f"llama3 rope_scaling / rope_parameters in {source} lack {missing}")
        # transformers (standardize_rope_params) defaults it to max_position_embeddings. When that
        # is absent too, transformers takes its class default, which our 4096 below need not
        # match: then one of the two must be given.
        original = rope.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
        if original is None:
            raise KeyError(f"llama3 rope_scaling / rope_parameters in {source} need "
                           "original_max_position_embeddings (or max_position_embeddings, "
                           "its fallback)")
        scaling = Llama3RopeScaling(
            factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(original))
    else:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: default, llama3")

    req = {k: _required(hf, k, source) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                  "num_hidden_layers", "num_attention_heads")}
    heads = req["num_attention_heads"]
    head_dim = hf.get("head_dim") or _HEAD_DIM_DEFAULT.get(family, req["hidden_size"] // heads)
    return ModelConfig(
        vocab_size=req["vocab_size"], hidden_size=req["hidden_size"],
        intermediate_size=req["intermediate_size"], num_layers=req["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
        family=family, rope_theta=float(theta), rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        param_dtype=param_dtype, dtype=dtype, remat=remat)


def config_to_hf(config: ModelConfig) -> dict:
    """config.json contents for ``config`` (both the old and the transformers 5 RoPE fields)."""
    arch = next(a for a, (fam, _) in ARCHITECTURES.items() if fam == config.family)
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    scaling = None
    if config.rope_scaling is not None:
        s = config.rope_scaling
        scaling = {"rope_type": "llama3", "factor": s.factor,
                   "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                   "original_max_position_embeddings": s.original_max_position_embeddings}
        rope = {**scaling, "rope_theta": config.rope_theta}
    out = {
        "architectures": [arch], "model_type": ARCHITECTURES[arch][1],
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "rope_scaling": scaling, "rope_parameters": rope,
        "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": False,
        "torch_dtype": config.param_dtype, "dtype": config.param_dtype,
    }
    if config.family == "llama":
        out["mlp_bias"] = False
    else:
        out.update(use_sliding_window=False, sliding_window=None)
        if config.family == "qwen2":
            del out["attention_bias"]  # Qwen2's q/k/v biases are implied by the architecture
    return out


# ----------------------------------------------------------------------------- tensor names


def tensor_map(config: ModelConfig) -> dict[str, tuple[tuple[str, ...], str]]:
    """HF tensor name -> (path into params, kind). kind: 'embed' (same layout), 'vector'
    (reshape only), 'linear1' / 'linear2' (transpose; 1 or 2 leading trustrl dims are HF's input)."""
    m = {"model.embed_tokens.weight": (("embedding",), "embed"),
         "model.norm.weight": (("final_norm", "scale"), "vector")}
    if not config.tie_word_embeddings:
        m["lm_head.weight"] = (("lm_head",), "linear1")
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}", f"layers_{i}"
        m[f"{hf}.input_layernorm.weight"] = ((ours, "input_norm", "scale"), "vector")
        m[f"{hf}.post_attention_layernorm.weight"] = ((ours, "post_attn_norm", "scale"), "vector")
        for name in ("q_proj", "k_proj", "v_proj"):
            m[f"{hf}.self_attn.{name}.weight"] = ((ours, "attn", name), "linear1")
        m[f"{hf}.self_attn.o_proj.weight"] = ((ours, "attn", "o_proj"), "linear2")
        if config.qkv_bias:
            for name in ("q", "k", "v"):
                m[f"{hf}.self_attn.{name}_proj.bias"] = ((ours, "attn", f"{name}_bias"), "vector")
        if config.qk_norm:
            for name in ("q_norm", "k_norm"):
                m[f"{hf}.self_attn.{name}.weight"] = ((ours, "attn", name, "scale"), "vector")
        for name in ("gate_proj", "up_proj", "down_proj"):
            m[f"{hf}.mlp.{name}.weight"] = ((ours, "mlp", name), "linear1")
    return m


def _hf_shape(kind: str, shape: tuple) -> tuple:
    if kind == "embed":
        return tuple(shape)
    if kind == "vector":
        return (math.prod(shape),)
    n_in = int(kind[-1])
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def _to_ours(kind: str, w: np.ndarray, shape: tuple) -> np.ndarray:
    return (w.T if kind.startswith("linear") else w).reshape(shape)


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
    if kind.startswith("linear"):
        return x.reshape(_hf_shape(kind, x.shape)[::-1]).T
    return x.reshape(_hf_shape(kind, x.shape))


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------- load / save


def _read_json(file: str) -> dict:
    with open(file) as f:
        try:
            out = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(out, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(out).__name__}")
    return out


def _shard_error(file: str, shards: list[str], e: Exception, what: str = "",
                 hint: str = "; the file is truncated or corrupt (re-download it)") -> ValueError:
    which = f" (shard {shards.index(file) + 1} of {len(shards)})" if len(shards) > 1 else ""
    return ValueError(f"cannot read {what}safetensors file {file}{which}: {e}{hint}")


def _open_safetensors(file: str, shards: list[str]):
    """safe_open(file) (it parses the header), read errors naming the file and its shard."""
    try:
        return safe_open(file, "np")
    except (SafetensorError, OSError) as e:
        raise _shard_error(file, shards, e) from e


def _weight_files(path: str) -> dict[str, str]:
    """HF tensor name -> safetensors file, from the index or the single model.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map' (tensor name -> file)")
        files = {name: os.path.join(path, file) for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not os.path.exists(file):
                raise FileNotFoundError(f"{file} is listed in {index} but does not exist")
        return files
    if os.path.exists(single):
        with _open_safetensors(single, [single]) as f:
            return {name: single for name in f.keys()}
    others = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".gguf")))
    hint = f" (found {others}: only safetensors are read, convert them)" if others else ""
    raise FileNotFoundError(f"no weights in {path}: expected {single} or {index}{hint}")


def read_config(path: str, **kwargs) -> ModelConfig:
    """ModelConfig from ``path``/config.json (kwargs: param_dtype, dtype, remat)."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        why = "is not a directory" if os.path.exists(path) else "does not exist"
        raise FileNotFoundError(f"no Hugging Face config at {cfg_file}: {path} {why}")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"no Hugging Face config at {cfg_file}")
    return config_from_hf(_read_json(cfg_file), source=cfg_file, **kwargs)


def load_hf_dir(path: str, *, mesh=None, rules=sharding_lib.LOGICAL_RULES,
                param_dtype="float32", dtype="float32", remat=ModelConfig.remat):
    """Loads a local HF directory -> (ModelConfig, params), params sharded over ``mesh``.

    Without a mesh, params land on the default device. Errors name the missing file or tensor,
    or the tensor whose shape does not match the config.
    """
    config = read_config(path, param_dtype=param_dtype, dtype=dtype, remat=remat)
    files = _weight_files(path)
    names = tensor_map(config)
    missing = [n for n in names if n not in files]
    if missing:
        raise KeyError(f"{len(missing)} tensor(s) missing from the checkpoint in {path}: "
                       f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    # Extra tensors we knowingly ignore: RoPE buffers, and lm_head when the head is tied.
    ignorable = re.compile(r".*rotary_emb\.inv_freq$|^lm_head\.weight$")
    unused = [n for n in files if n not in names and not ignorable.match(n)]
    if unused:
        raise ValueError(f"checkpoint in {path} has tensors the config does not use "
                         f"(wrong num_hidden_layers / architecture?): {sorted(unused)[:5]}")

    # Read in the unrolled layout (tensor_map's layers_i paths); stacked at the end when the
    # config scans its layers.
    flat_cfg = unrolled_config(config)
    shapes = param_shapes(flat_cfg)
    shardings = param_shardings(flat_cfg, mesh, rules) if mesh is not None else None
    np_dtype = _DTYPES[param_dtype]
    params: dict = {}
    handles = {}
    shards = sorted(set(files.values()))
    try:
        for name, (ppath, kind) in names.items():
            file = files[name]
            if file not in handles:
                handles[file] = _open_safetensors(file, shards).__enter__()
            try:
                w = handles[file].get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise _shard_error(file, shards, e, f"tensor {name} from ", hint="") from e
            shape = _get(shapes, ppath).shape
            if tuple(w.shape) != _hf_shape(kind, shape):
                raise ValueError(f"tensor {name} in {file} has shape {tuple(w.shape)}, expected "
                                 f"{_hf_shape(kind, shape)} for the config in {path}")
            host = np.ascontiguousarray(_to_ours(kind, w.astype(np_dtype), shape))
            if shardings is None:
                value = jax.device_put(host)
            else:  # each device pulls only its slice of the host array
                value = jax.make_array_from_callback(shape, _get(shardings, ppath),
                                                     lambda idx, host=host: host[idx])
            _set(params, ppath, value)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return config, stack_layers(params, config, mesh, rules)


def save_hf_dir(params, config: ModelConfig, path: str, *, copy_from: str | None = None):
    """Writes config.json + model.safetensors (in ``config.param_dtype``) that transformers loads.

    ``copy_from``: a HF directory whose tokenizer / generation files are copied alongside.
    Gathers the parameters to the host (fine up to a few billion parameters).
    """
    os.makedirs(path, exist_ok=True)
    params = unstack_layers(jax.device_get(params), config)  # host views layers_i of [L, ...]
    tensors = {}
    for name, (ppath, kind) in tensor_map(config).items():
        x = np.asarray(jax.device_get(_get(params, ppath)))
        tensors[name] = np.ascontiguousarray(_to_hf(kind, x))
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(config), f, indent=2)
    if copy_from is not None:
        for file in _NON_WEIGHT_FILES:
            if os.path.exists(os.path.join(copy_from, file)):
                shutil.copy(os.path.join(copy_from, file), os.path.join(path, file))
    return path
