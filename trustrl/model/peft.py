"""LoRA adapters <-> PEFT adapter directories (adapter_config.json + adapter_model.safetensors).

    peft.save_adapters(adapters, model_cfg, "/tmp/adapter", base_model_name_or_path=hf_dir)
    adapters = peft.load_adapters("/tmp/adapter", model_cfg, shardings=adapter_shardings)

The directory is what PEFT (0.21) writes for a LoRA adapter on a transformers Llama / Qwen2 /
Qwen3 (/ Qwen3-MoE attention) model, so ``peft.PeftModel.from_pretrained(base, dir)`` loads it,
and what it reads back: tensors

    base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight
    base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight

with lora_A [r, in_features] and lora_B [out_features, r] (torch Linear layout, float32), and
the config PEFT needs to rebuild the adapter (peft_type LORA, r, lora_alpha, target_modules,
task_type CAUSAL_LM, ...). PEFT computes ``y = x W^T + (lora_alpha / r) (x A^T) B^T``, the same
as trustrl's ``x @ W + (alpha / rank) (x @ A) @ B`` (trustrl.model.lora) with

    A_peft = A.reshape(prod(*in), r).T        B_peft = B.reshape(r, prod(*out)).T

where trustrl's multi-axis kernels flatten exactly as Hugging Face's weights do
(trustrl.model.hf: q_proj's [E, H, D] is weight.T reshaped, out index h * D + d; o_proj's
[H, D, E] likewise on its input side). So q_proj's B [r, H, D] becomes [H * D, r] and o_proj's A
[H, D, r] becomes [r, H * D]. Stacked layers (``scan_layers``: a leading [L] axis) and unrolled
ones (``layers_{i}``) are both handled; the files do not depend on the layout.

Loading refuses (ValueError naming the model.lora.* field, or the model field, and both values)
an adapter whose r, lora_alpha, target_modules, use_rslora, layers or tensor shapes disagree
with the model, and PEFT options trustrl does not implement (DoRA, biases, per-module
rank / alpha patterns, modules_to_save, fan_in_fan_out).
"""
from __future__ import annotations

import json
import math
import os
import re

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from trustrl.infra import multihost
from trustrl.model import lora
from trustrl.model.transformer import ModelConfig, param_shapes

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers"
# trustrl's module of a layer -> transformers' submodule name
_MODULES = {"attn": "self_attn", "mlp": "mlp"}
# PEFT's values for the options trustrl implements one way only (a LoRA adapter without extras)
_FIXED = {"bias": "none", "fan_in_fan_out": False, "use_dora": False, "lora_bias": False,
          "use_rslora": False}
_EMPTY = ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform",
          "exclude_modules", "trainable_token_indices", "target_parameters")


def _tensor_name(layer: int, module: str, target: str, which: str) -> str:
    return f"{PREFIX}.{layer}.{_MODULES[module]}.{target}.lora_{which}.weight"


def _abstract_adapters(model_cfg: ModelConfig) -> dict:
    """{(layer, module, target): (A's shape, B's shape)} of the model's adapters, unrolled
    (per layer, without the [L] axis); from the model's abstract parameters (no computation)."""
    if not model_cfg.lora_rank:
        raise ValueError("model.lora.rank=0: the model has no LoRA adapters to save or load "
                         "(set model.lora.rank / alpha / targets)")
    _, adapters = lora.split(param_shapes(model_cfg))
    out = {}
    for layer, module, target, a, b in _walk(adapters, model_cfg):
        out[(layer, module, target)] = (a.shape, b.shape)
    return out


def _walk(adapters, model_cfg: ModelConfig):
    """(layer, module, target, A, B) per adapter of a lora.split tree, unrolled: stacked
    ``layers`` leaves are indexed per layer (array slices, or shapes without the [L] axis)."""
    def strip(x):  # one layer of a stacked leaf: shapes for abstract leaves, a slice otherwise
        if isinstance(x, jax.ShapeDtypeStruct):
            return [jax.ShapeDtypeStruct(x.shape[1:], x.dtype)] * x.shape[0]
        return [x[i] for i in range(x.shape[0])]

    for name, layer_tree in adapters.items():
        if name == "layers" and model_cfg.scan_layers:
            layers = range(model_cfg.num_layers)
        elif re.fullmatch(r"layers_\d+", name):
            layers = [int(name.split("_")[1])]
        else:
            raise ValueError(f"unexpected adapters outside the decoder layers: {name!r} (LoRA "
                             f"adapts only {tuple(lora.TARGETS)})")
        for module, leaves in layer_tree.items():
            if module not in _MODULES:
                raise ValueError(f"unexpected adapters in module {module!r} of {name}")
            for leaf in leaves:
                if not leaf.endswith(lora.A_SUFFIX):
                    continue
                target = leaf[:-len(lora.A_SUFFIX)]
                a, b = leaves[leaf], leaves[target + lora.B_SUFFIX]
                if name == "layers" and model_cfg.scan_layers:
                    for i, ai, bi in zip(layers, strip(a), strip(b)):
                        yield i, module, target, ai, bi
                else:
                    yield layers[0], module, target, a, b


def check_no_expert_adapters(model_cfg: ModelConfig):
    """PEFT directories hold trustrl's attention and dense-MLP adapters only: a mixture of
    experts' per-expert adapters (MLP targets on sparse layers) are refused, naming the way
    out. (transformers 5 fuses a Qwen3-MoE layer's experts into 3-D parameters, which PEFT
    adapts through ``target_parameters`` with its own layout; not implemented here.)"""
    if lora.adapts_experts(model_cfg):
        mlp = [t for t in model_cfg.lora_targets if t in lora.MLP_TARGETS]
        raise ValueError(f"model.lora.targets {mlp} adapt the experts of a mixture of experts "
                         f"(one adapter per expert), which the PEFT format here does not hold; "
                         f"export with --format=merged, or train only {lora.ATTENTION_TARGETS} "
                         f"for a PEFT adapter")


def target_modules(model_cfg: ModelConfig) -> list:
    """PEFT's target_modules: the adapted projections' names, in lora.TARGETS' order."""
    return [t for t in lora.TARGETS if t in model_cfg.lora_targets]


def adapter_config(model_cfg: ModelConfig, base_model_name_or_path: str = "") -> dict:
    """adapter_config.json's contents: the fields PEFT reads to rebuild a LoRA adapter, with
    the values PEFT 0.21 writes for this adapter (a subset of its full dump: older PEFT
    versions reject fields they do not know)."""
    alpha = float(model_cfg.lora_alpha)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None, "revision": None,
        "r": int(model_cfg.lora_rank), "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": 0.0, "target_modules": target_modules(model_cfg),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True if model_cfg.lora_init == "kaiming" else "gaussian",
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def save_adapters(adapters, model_cfg: ModelConfig, out_dir: str,
                  base_model_name_or_path: str = "") -> str:
    """Writes ``adapters`` (lora.split's adapter tree of ``model_cfg``: arrays, sharded or not,
    stacked or unrolled) as a PEFT LoRA directory: adapter_config.json (``base_model_name_or_path``
    recorded in it, e.g. the base's model.hf_dir) and adapter_model.safetensors (float32).
    Gathers the adapters to the host (a collective across processes: every process calls it;
    each writes ``out_dir``, so give process 0 its own path or call it there only on one
    host). Returns ``out_dir``."""
    check_no_expert_adapters(model_cfg)
    want = _abstract_adapters(model_cfg)
    host = multihost.to_host(adapters)
    tensors = {}
    for layer, module, target, a, b in _walk(host, model_cfg):
        key = (layer, module, target)
        if key not in want or want[key] != (a.shape, b.shape):
            raise ValueError(f"adapter {target} of layer {layer} has shapes {a.shape} / "
                             f"{b.shape}, the model expects {want.get(key, 'none')}")
        r = a.shape[-1]
        a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
        tensors[_tensor_name(layer, module, target, "A")] = np.ascontiguousarray(
            a32.reshape(-1, r).T)
        tensors[_tensor_name(layer, module, target, "B")] = np.ascontiguousarray(
            b32.reshape(r, -1).T)
    missing = sorted(set(want) - {k for k in _keys_of(tensors)})
    if missing:
        raise ValueError(f"the adapters lack {len(missing)} of the model's adapters, e.g. "
                         f"{missing[0][2]} of layer {missing[0][0]}")
    os.makedirs(out_dir, exist_ok=True)
    save_file(dict(sorted(tensors.items())), os.path.join(out_dir, WEIGHTS_FILE),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(adapter_config(model_cfg, base_model_name_or_path), f, indent=2)
        f.write("\n")
    return out_dir


def _keys_of(tensors):
    for name in tensors:
        m = _NAME.fullmatch(name)
        if m and m.group(4) == "A":
            module = {v: k for k, v in _MODULES.items()}[m.group(2)]
            yield int(m.group(1)), module, m.group(3)


_NAME = re.compile(re.escape(PREFIX) + r"\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)\.weight")


def _read_config(path: str) -> dict:
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        why = "is not a directory" if os.path.exists(path) else "does not exist"
        raise FileNotFoundError(f"no PEFT adapter at {path}: it {why}")
    if not os.path.exists(file):
        raise FileNotFoundError(f"no PEFT adapter at {path}: {CONFIG_FILE} is missing")
    try:
        with open(file) as f:
            out = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {file}: {e}") from None
    if not isinstance(out, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(out).__name__}")
    return out


def check_adapter_config(config: dict, model_cfg: ModelConfig, source: str = CONFIG_FILE):
    """ValueError unless the PEFT config ``config`` describes ``model_cfg``'s adapters: the
    message names the model.lora.* field (or PEFT's option) with both values."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{source}: peft_type={peft_type!r}; only LoRA adapters (peft_type "
                         f"'LORA') load into model.lora")
    r = config.get("r")
    if r != model_cfg.lora_rank:
        raise ValueError(f"{source}: r={r} but model.lora.rank={model_cfg.lora_rank}: set "
                         f"model.lora.rank={r} to load this adapter")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or float(alpha) != float(model_cfg.lora_alpha):
        raise ValueError(f"{source}: lora_alpha={alpha} but model.lora.alpha="
                         f"{model_cfg.lora_alpha}: set model.lora.alpha={alpha} to load this "
                         f"adapter")
    if config.get("use_rslora", False):
        raise ValueError(f"{source}: use_rslora=true (scale lora_alpha / sqrt(r)), but trustrl "
                         f"scales adapters by model.lora.alpha / model.lora.rank (use_rslora="
                         f"false); convert it (alpha * sqrt(r) / r) or retrain")
    for key, want in _FIXED.items():
        if key != "use_rslora" and config.get(key, want) not in (want, None):
            raise ValueError(f"{source}: {key}={config[key]!r} is not supported (trustrl's LoRA "
                             f"has {key}={want!r})")
    for key in _EMPTY:
        if config.get(key):
            raise ValueError(f"{source}: {key}={config[key]!r} is not supported (trustrl's LoRA "
                             f"adapts every layer's targets alike, and nothing else)")
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple)):
        unknown = sorted(t for t in targets if t not in lora.TARGETS)
        if unknown:
            raise ValueError(f"{source}: target_modules has {unknown}, which trustrl does not "
                             f"adapt; model.lora.targets can name {tuple(lora.TARGETS)}")
        have = tuple(t for t in lora.TARGETS if t in targets)
        want = tuple(t for t in lora.TARGETS if t in model_cfg.lora_targets)
        if have != want:
            raise ValueError(f"{source}: target_modules={sorted(targets)} but model.lora.targets"
                             f"={want}: set model.lora.targets={have} to load this adapter")
    elif not isinstance(targets, str):  # a regex: checked on the tensors it names
        raise ValueError(f"{source}: target_modules={targets!r} must be a list of module names "
                         f"(or a regex string)")


def load_adapters(path: str, model_cfg: ModelConfig, shardings=None):
    """The adapters tree (lora.split's layout for ``model_cfg``: stacked or unrolled, float32)
    of the PEFT LoRA directory ``path``, placed with ``shardings`` (a matching tree of
    Shardings, e.g. ``lora.split(param_shardings(model_cfg, mesh))[1]``; each device receives
    only its slice) or on the default device. Refuses (ValueError naming the field and both
    values) an adapter that disagrees with ``model_cfg`` (see ``check_adapter_config``), whose
    layers or tensor shapes differ from the model's, or that lacks / has extra tensors."""
    check_no_expert_adapters(model_cfg)
    config = _read_config(path)
    check_adapter_config(config, model_cfg, os.path.join(path, CONFIG_FILE))
    want = _abstract_adapters(model_cfg)
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.exists(file):
        others = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth")))
        hint = f" (found {others}: only safetensors are read, convert them)" if others else ""
        raise FileNotFoundError(f"no adapter weights in {path}: {WEIGHTS_FILE} is missing{hint}")
    try:
        with safe_open(file, "np") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {file}: {e}") from None

    names = {}
    for name in tensors:
        m = _NAME.fullmatch(name)
        if m is None:
            raise ValueError(f"{file}: tensor {name!r} is not a LoRA weight of a decoder "
                             f"layer's projection ({PREFIX}.<i>.<self_attn|mlp>.<proj>."
                             f"lora_<A|B>.weight); trustrl adapts only {tuple(lora.TARGETS)}")
        layer, hf_module, target, which = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        module = {v: k for k, v in _MODULES.items()}[hf_module]
        names[(layer, module, target, which)] = name
    layers = sorted({k[0] for k in names})
    if layers and (layers[-1] >= model_cfg.num_layers):
        raise ValueError(f"{file} adapts layers up to {layers[-1]} ({layers[-1] + 1} layers) but "
                         f"the model has model.num_layers={model_cfg.num_layers}: an adapter of "
                         f"another model")
    have = {k[:3] for k in names}
    extra = sorted(have - set(want))
    if extra:
        layer, _, target = extra[0]
        raise ValueError(f"{file} adapts {target} of layer {layer}, which model.lora.targets="
                         f"{tuple(model_cfg.lora_targets)} does not adapt in this model")
    missing = sorted(k + (w,) for k in want for w in "AB" if k + (w,) not in names)
    if missing:
        layer, module, target, which = missing[0]
        raise ValueError(f"{file} lacks {len(missing)} of the model's adapter tensors (model."
                         f"lora.targets={tuple(model_cfg.lora_targets)}, model.num_layers="
                         f"{model_cfg.num_layers}), e.g. "
                         f"{_tensor_name(layer, module, target, which)}")

    r = model_cfg.lora_rank
    per_layer = {}
    for key, (a_shape, b_shape) in want.items():
        layer, module, target = key
        a, b = tensors[names[key + ("A",)]], tensors[names[key + ("B",)]]
        for which, x, shape in (("A", a, (r, math.prod(a_shape[:-1]))),
                                ("B", b, (math.prod(b_shape[1:]), r))):
            if tuple(x.shape) != shape:
                raise ValueError(f"{file}: {names[key + (which,)]} has shape {tuple(x.shape)}, "
                                 f"expected {shape} for this model (model.lora.rank={r}; "
                                 f"the base's hidden / head / MLP sizes): an adapter of another "
                                 f"model")
        per_layer[key] = (np.asarray(a, np.float32).T.reshape(a_shape),
                          np.asarray(b, np.float32).T.reshape(b_shape))

    tree: dict = {}
    for (layer, module, target), (a, b) in sorted(per_layer.items()):
        leaves = tree.setdefault(f"layers_{layer}", {}).setdefault(module, {})
        leaves[target + lora.A_SUFFIX], leaves[target + lora.B_SUFFIX] = a, b
    if model_cfg.scan_layers:
        names_l = [f"layers_{i}" for i in range(model_cfg.num_layers)]
        tree = {"layers": jax.tree.map(lambda *xs: np.stack(xs), *[tree[n] for n in names_l])}
    if shardings is None:
        return jax.tree.map(jax.device_put, tree)
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx]),
        tree, shardings)
