"""Hugging Face checkpoint directories <-> trustrl parameters (Llama, Qwen2, Qwen3, Qwen3-MoE).

    config, params = hf.load_hf_dir("/path/to/Qwen3-0.6B", mesh=mesh)   # sharded on load
    hf.save_hf_dir(params, config, "/tmp/out")  # transformers.AutoModelForCausalLM loads it

Loading reads ``config.json`` and ``model.safetensors`` (or the shards listed in
``model.safetensors.index.json``) one tensor at a time (memory-mapped), converts it to trustrl's
layout and places it with its ``NamedSharding`` via ``jax.make_array_from_callback``: each device
(and each host, multi-host) receives only its own slice; the whole model never sits on one device.

Layout: Hugging Face stores Linear weights as [out, in]; trustrl stores kernels as [in, out] with
the head axes split out (q_proj [E, H, D], o_proj [H, D, E]) so they can carry logical axis names.

Qwen3-MoE (``Qwen3MoeForCausalLM``): the hub stores a sparse layer's router as ``mlp.gate.weight``
[X, E] and each expert's SwiGLU as its own Linear weights ``mlp.experts.{j}.gate_proj`` /
``up_proj`` [F, E] and ``down_proj`` [E, F]; trustrl stacks the experts (``expert_gate`` /
``expert_up`` [X, E, F], ``expert_down`` [X, F, E], ``router`` [E, X]). Export writes the hub's
per-expert layout (what transformers 5's ``save_pretrained`` writes too); loading also reads
transformers 5's in-memory fused layout (``mlp.experts.gate_up_proj`` [X, 2F, E], gate rows
first, and ``mlp.experts.down_proj`` [X, E, F]) when a checkpoint stores that. Dense layers
among the sparse ones (``mlp_only_layers`` / ``decoder_sparse_step``) keep the dense MLP names;
such a mixed model loads with ``scan_layers=False`` (scanned layers must be alike).

The steps are functions of their own, shared with trustrl.model.reward_model (a sequence
classifier is the same trunk plus a score head): reading is ``weight_files`` (tensor -> file)
-> ``load_plan`` (tensor -> param path) -> ``check_plan`` -> ``read_params``; writing is
``hf_tensors`` (params -> HF tensors) -> ``write_hf_dir`` (with any extra tensors and config).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from typing import NamedTuple

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
    "Qwen3MoeForCausalLM": ("qwen3_moe", "qwen3_moe"),
}
# Defaults of the transformers config classes for fields a config.json may omit. (Qwen3MoeConfig
# has no head_dim field: its attention takes hidden_size // num_attention_heads then.)
_HEAD_DIM_DEFAULT = {"qwen3": 128}
_INTERMEDIATE_DEFAULT = {"qwen3_moe": 6144}  # only the dense layers (mlp_only_layers) use it
# A sparse layer's experts in trustrl -> the hub's per-expert Linear names.
_EXPERT_NAMES = {"expert_gate": "gate_proj", "expert_up": "up_proj", "expert_down": "down_proj"}
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

    if family in _INTERMEDIATE_DEFAULT and hf.get("intermediate_size") is None:
        hf = {**hf, "intermediate_size": _INTERMEDIATE_DEFAULT[family]}
    req = {k: _required(hf, k, source) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                  "num_hidden_layers", "num_attention_heads")}
    heads = req["num_attention_heads"]
    head_dim = hf.get("head_dim") or _HEAD_DIM_DEFAULT.get(family, req["hidden_size"] // heads)
    fields = dict(
        vocab_size=req["vocab_size"], hidden_size=req["hidden_size"],
        intermediate_size=req["intermediate_size"], num_layers=req["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
        family=family, rope_theta=float(theta), rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        param_dtype=param_dtype, dtype=dtype, remat=remat)
    if family == "qwen3_moe":
        fields.update(_moe_fields(hf, source))
    try:
        return ModelConfig(**fields)
    except ValueError as e:  # e.g. num_experts_per_tok > num_experts: name the file
        raise ValueError(f"{source}: {e}") from e


def _moe_fields(hf: dict, source: str) -> dict:
    """Qwen3MoeConfig's fields of a config.json -> ModelConfig's (with Qwen3MoeConfig's defaults
    for the optional ones). transformers 5 writes num_experts as ``num_local_experts`` (its
    attribute map); the hub's configs say ``num_experts``: either is read."""
    names = [k for k in ("num_experts", "num_local_experts") if hf.get(k) is not None]
    if not names:
        raise KeyError(f"{source} has no 'num_experts' (or 'num_local_experts'), which the "
                       f"Qwen3-MoE model needs")
    if len({hf[k] for k in names}) > 1:
        raise ValueError(f"{source} gives num_experts={hf['num_experts']} and "
                         f"num_local_experts={hf['num_local_experts']}: they must agree")
    only = hf.get("mlp_only_layers") or []
    if not isinstance(only, (list, tuple)) or not all(isinstance(i, int) for i in only):
        raise ValueError(f"mlp_only_layers in {source} must be a list of layer indices, "
                         f"got {only!r}")
    fields = dict(
        num_experts=int(hf[names[0]]),
        num_experts_per_tok=int(_required(hf, "num_experts_per_tok", source)),
        moe_intermediate_size=int(_required(hf, "moe_intermediate_size", source)),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)), mlp_only_layers=tuple(only))
    # Scanned layers must be alike: a model with dense layers among the sparse ones is unrolled.
    # (router_aux_loss_coef / output_router_logits are training options, not model fields.)
    n, step = int(hf["num_hidden_layers"]), max(fields["decoder_sparse_step"], 1)
    sparse = [i for i in range(n) if i not in only and (i + 1) % step == 0]
    fields["scan_layers"] = len(sparse) in (0, n)
    return fields


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
    if config.family == "qwen3_moe":  # the hub's key is num_experts (transformers 5 maps it)
        out.update(num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                   moe_intermediate_size=config.moe_intermediate_size,
                   norm_topk_prob=config.norm_topk_prob,
                   decoder_sparse_step=config.decoder_sparse_step,
                   mlp_only_layers=list(config.mlp_only_layers))
    return out


# ----------------------------------------------------------------------------- tensor names


class Entry(NamedTuple):
    """Where one Hugging Face tensor goes: ``path`` into the (unrolled) params and ``kind``:
    'embed' (same layout), 'vector' (reshape only), 'linear1' / 'linear2' (transpose; 1 or 2
    leading trustrl dims are HF's input); with ``expert`` j, the tensor is slice j of the stacked
    experts (Qwen3-MoE's per-expert Linear weights). The fused kinds (transformers 5's layout):
    'gate_up0' / 'gate_up1' (the gate / up half of gate_up_proj [X, 2F, E]), 'experts_down'
    (down_proj [X, E, F])."""
    path: tuple[str, ...]
    kind: str
    expert: int | None = None


def tensor_map(config: ModelConfig) -> dict[str, Entry]:
    """HF tensor name -> Entry, in the hub's layout (Qwen3-MoE: per-expert tensors)."""
    m = {"model.embed_tokens.weight": Entry(("embedding",), "embed"),
         "model.norm.weight": Entry(("final_norm", "scale"), "vector")}
    if not config.tie_word_embeddings:
        m["lm_head.weight"] = Entry(("lm_head",), "linear1")
    sparse = set(config.sparse_layers)
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}", f"layers_{i}"
        m[f"{hf}.input_layernorm.weight"] = Entry((ours, "input_norm", "scale"), "vector")
        m[f"{hf}.post_attention_layernorm.weight"] = Entry((ours, "post_attn_norm", "scale"),
                                                           "vector")
        for name in ("q_proj", "k_proj", "v_proj"):
            m[f"{hf}.self_attn.{name}.weight"] = Entry((ours, "attn", name), "linear1")
        m[f"{hf}.self_attn.o_proj.weight"] = Entry((ours, "attn", "o_proj"), "linear2")
        if config.qkv_bias:
            for name in ("q", "k", "v"):
                m[f"{hf}.self_attn.{name}_proj.bias"] = Entry((ours, "attn", f"{name}_bias"),
                                                              "vector")
        if config.qk_norm:
            for name in ("q_norm", "k_norm"):
                m[f"{hf}.self_attn.{name}.weight"] = Entry((ours, "attn", name, "scale"), "vector")
        if i in sparse:
            m[f"{hf}.mlp.gate.weight"] = Entry((ours, "mlp", "router"), "linear1")
            for j in range(config.num_experts):
                for name, hf_name in _EXPERT_NAMES.items():
                    m[f"{hf}.mlp.experts.{j}.{hf_name}.weight"] = Entry((ours, "mlp", name),
                                                                        "linear1", j)
        else:
            for name in ("gate_proj", "up_proj", "down_proj"):
                m[f"{hf}.mlp.{name}.weight"] = Entry((ours, "mlp", name), "linear1")
    return m


def _fused_names(layer: int) -> tuple[str, str]:
    return (f"model.layers.{layer}.mlp.experts.gate_up_proj",
            f"model.layers.{layer}.mlp.experts.down_proj")


def load_plan(config: ModelConfig, available) -> list[tuple[str, Entry]]:
    """(HF tensor name, Entry) pairs to read for ``config`` from a checkpoint holding the tensor
    names ``available``: the hub's layout, except sparse layers whose experts the checkpoint
    stores fused (transformers 5's gate_up_proj / down_proj). A name may appear twice (the fused
    gate_up_proj fills expert_gate and expert_up)."""
    available = set(available)
    fused = {}
    for i in config.sparse_layers:
        names = _fused_names(i)
        if any(n in available for n in names):
            fused[f"layers_{i}"] = names
            per_expert = sorted(n for n in available
                                if n.startswith(f"model.layers.{i}.mlp.experts.")
                                and n not in names)
            if per_expert:
                raise ValueError(f"layer {i} stores its experts both fused ({names[0]} / "
                                 f"{names[1]}) and per expert ({per_expert[0]} ...): one of the "
                                 f"two layouts, please")
    plan = []
    for name, entry in tensor_map(config).items():
        if entry.expert is None or entry.path[0] not in fused:
            plan.append((name, entry))
        elif entry.expert == 0:  # a fused layer: its three stacked params, once each
            gate_up, down = fused[entry.path[0]]
            which = entry.path[-1]
            plan.append((down, Entry(entry.path, "experts_down")) if which == "expert_down" else
                        (gate_up, Entry(entry.path, f"gate_up{int(which == 'expert_up')}")))
    return plan


def _hf_shape(kind: str, shape: tuple) -> tuple:
    if kind == "embed":
        return tuple(shape)
    if kind == "vector":
        return (math.prod(shape),)
    if kind.startswith("gate_up"):  # ours [X, E, F] <- [X, 2F, E]
        return (shape[0], 2 * shape[2], shape[1])
    if kind == "experts_down":  # ours [X, F, E] <- [X, E, F]
        return (shape[0], shape[2], shape[1])
    n_in = int(kind[-1])
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def _entry_hf_shape(entry: Entry, shape: tuple) -> tuple:
    """The HF tensor's shape for ``entry`` into a param of ``shape``."""
    return _hf_shape(entry.kind, shape if entry.expert is None else shape[1:])


def _to_ours(kind: str, w: np.ndarray, shape: tuple) -> np.ndarray:
    if kind.startswith("gate_up"):
        f = shape[2]
        half = int(kind[-1])
        return w[:, half * f:(half + 1) * f, :].transpose(0, 2, 1)
    if kind == "experts_down":
        return w.transpose(0, 2, 1)
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


def weight_files(path: str) -> dict[str, str]:
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


def config_json(path: str) -> tuple[dict, str]:
    """(the parsed ``path``/config.json, that file's name); errors name what is missing."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        why = "is not a directory" if os.path.exists(path) else "does not exist"
        raise FileNotFoundError(f"no Hugging Face config at {cfg_file}: {path} {why}")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"no Hugging Face config at {cfg_file}")
    return _read_json(cfg_file), cfg_file


def read_config(path: str, **kwargs) -> ModelConfig:
    """ModelConfig from ``path``/config.json (kwargs: param_dtype, dtype, remat)."""
    hf_cfg, cfg_file = config_json(path)
    return config_from_hf(hf_cfg, source=cfg_file, **kwargs)


def load_hf_dir(path: str, *, mesh=None, rules=sharding_lib.LOGICAL_RULES,
                param_dtype="float32", dtype="float32", remat=ModelConfig.remat):
    """Loads a local HF directory -> (ModelConfig, params), params sharded over ``mesh``.

    Without a mesh, params land on the default device. Errors name the missing file or tensor,
    or the tensor whose shape does not match the config.
    """
    config = read_config(path, param_dtype=param_dtype, dtype=dtype, remat=remat)
    files = weight_files(path)
    plan = load_plan(config, files)
    check_plan(path, config, plan, files)
    flat_cfg = unrolled_config(config)
    shardings = param_shardings(flat_cfg, mesh, rules) if mesh is not None else None
    params = read_params(path, plan, files, param_shapes(flat_cfg), shardings, param_dtype)
    return config, stack_layers(params, config, mesh, rules)


# Extra tensors a checkpoint may hold that we knowingly ignore: RoPE buffers, and lm_head when
# the head is tied.
IGNORABLE = re.compile(r".*rotary_emb\.inv_freq$|^lm_head\.weight$")


def check_plan(path: str, config: ModelConfig, plan, files, ignorable=IGNORABLE):
    """Every tensor of ``plan`` is in the checkpoint ``files`` (name -> file, ``weight_files``)
    and every checkpoint tensor is in the plan or ``ignorable``; errors name the tensors."""
    names = {name for name, _ in plan}
    missing = [n for n, _ in plan if n not in files]
    if missing:
        raise KeyError(f"{len(missing)} tensor(s) missing from the checkpoint in {path}: "
                       f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unused = [n for n in files if n not in names and not ignorable.match(n)]
    if unused:
        fields = ("num_hidden_layers / num_experts / mlp_only_layers / decoder_sparse_step"
                  if config.num_experts else "num_hidden_layers")
        raise ValueError(f"checkpoint in {path} has tensors the config does not use "
                         f"(wrong {fields} / architecture?): {sorted(unused)[:5]}")


def read_params(path: str, plan, files, shapes, shardings=None, param_dtype="float32") -> dict:
    """The tensors of ``plan`` ((HF name, Entry) pairs, ``load_plan``) read from ``files`` (HF
    name -> safetensors file, ``weight_files``) into a nested dict at each Entry's path:
    ``shapes`` (a pytree of ShapeDtypeStructs holding every Entry path, e.g. ``param_shapes`` of
    an unrolled config) gives each param's shape, ``shardings`` (the same tree of
    NamedShardings, or None: the default device) its placement, ``param_dtype`` its dtype.

    One tensor at a time, memory-mapped; a param fed by several tensors (the experts) is
    assembled on the host first; with shardings each device pulls only its slice
    (``jax.make_array_from_callback``). Errors name the tensor, its file (and shard) and the
    shape expected for the config in ``path``.
    """
    by_path: dict[tuple, list[tuple[str, Entry]]] = {}
    for name, entry in plan:
        by_path.setdefault(entry.path, []).append((name, entry))
    np_dtype = _DTYPES[param_dtype]
    params: dict = {}
    handles = {}
    shards = sorted(set(files.values()))

    def read(name, entry, shape):
        file = files[name]
        if file not in handles:
            handles[file] = _open_safetensors(file, shards).__enter__()
        try:
            w = handles[file].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise _shard_error(file, shards, e, f"tensor {name} from ", hint="") from e
        want = _entry_hf_shape(entry, shape)
        if tuple(w.shape) != want:
            what = "" if entry.expert is None else f" (expert {entry.expert} of {shape[0]})"
            raise ValueError(f"tensor {name} in {file} has shape {tuple(w.shape)}, expected "
                             f"{want}{what} for the config in {path}")
        return _to_ours(entry.kind, w.astype(np_dtype),
                        shape if entry.expert is None else shape[1:])

    try:
        for ppath, sources in by_path.items():
            shape = _get(shapes, ppath).shape
            if len(sources) == 1 and sources[0][1].expert is None:
                host = np.ascontiguousarray(read(*sources[0], shape))
            else:  # the experts of a sparse layer, one tensor per expert
                host = np.empty(shape, np_dtype)
                for name, entry in sources:
                    host[entry.expert] = read(name, entry, shape)
            if shardings is None:
                value = jax.device_put(host)
            else:  # each device pulls only its slice of the host array
                value = jax.make_array_from_callback(shape, _get(shardings, ppath),
                                                     lambda idx, host=host: host[idx])
            _set(params, ppath, value)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return params


def _write_weights(tensors: dict, path: str, max_shard_size: int | None):
    """model.safetensors, or shards + index when ``max_shard_size`` splits them. Removes the
    other form's stale file (an old index would otherwise shadow a new model.safetensors)."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    shards: list[dict] = [{}]
    size = 0
    for name, x in tensors.items():
        if max_shard_size is not None and shards[-1] and size + x.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    stale = index if len(shards) == 1 else single
    if os.path.exists(stale):
        os.remove(stale)
    if len(shards) == 1:
        save_file(tensors, single, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, part in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in part})
    total = sum(x.nbytes for x in tensors.values())
    with open(index, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save_hf_dir(params, config: ModelConfig, path: str, *, copy_from: str | None = None,
                max_shard_size: int | None = None):
    """Writes config.json + model.safetensors (in ``config.param_dtype``) that transformers loads.

    ``copy_from``: a HF directory whose tokenizer / generation files are copied alongside.
    ``max_shard_size``: bytes per file; the weights then go to model-0000i-of-0000n.safetensors
    files listed by model.safetensors.index.json (as transformers writes large models; a tensor
    larger than that gets its own file). None: one model.safetensors.
    Qwen3-MoE experts are written per expert (the hub's layout).
    Gathers the parameters to the host (fine up to a few billion parameters).
    """
    _check_shard_size(max_shard_size)
    os.makedirs(path, exist_ok=True)
    return write_hf_dir(path, hf_tensors(params, config), config_to_hf(config),
                        copy_from=copy_from, max_shard_size=max_shard_size)


def _check_shard_size(max_shard_size: int | None):
    if max_shard_size is not None and max_shard_size < 1:
        raise ValueError(f"max_shard_size must be >= 1 byte (or None: one file), got "
                         f"{max_shard_size}")


def hf_tensors(params, config: ModelConfig) -> dict[str, np.ndarray]:
    """HF tensor name -> host array in the hub's layout (``tensor_map``; Qwen3-MoE experts per
    expert), in the params' dtype. Gathers the parameters to the host."""
    params = unstack_layers(jax.device_get(params), config)  # host views layers_i of [L, ...]
    tensors = {}
    for name, entry in tensor_map(config).items():
        x = np.asarray(jax.device_get(_get(params, entry.path)))
        if entry.expert is not None:
            x = x[entry.expert]
        tensors[name] = np.ascontiguousarray(_to_hf(entry.kind, x))
    return tensors


def write_hf_dir(path: str, tensors: dict, hf_config: dict, *, copy_from: str | None = None,
                 max_shard_size: int | None = None) -> str:
    """Writes ``tensors`` (HF name -> host array; ``hf_tensors`` plus any extra, e.g. a
    sequence classifier's score.weight) as model.safetensors (or shards + index, see
    ``save_hf_dir``), ``hf_config`` as config.json, and copies ``copy_from``'s tokenizer /
    generation files (_NON_WEIGHT_FILES) alongside. Returns ``path``."""
    _check_shard_size(max_shard_size)
    os.makedirs(path, exist_ok=True)
    _write_weights(tensors, path, max_shard_size)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if copy_from is not None:
        for file in _NON_WEIGHT_FILES:
            if os.path.exists(os.path.join(copy_from, file)):
                shutil.copy(os.path.join(copy_from, file), os.path.join(path, file))
    return path
