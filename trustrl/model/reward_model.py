"""Reward models: Hugging Face ``*ForSequenceClassification`` checkpoints, scored in JAX.

    config, params = reward_model.load_hf_dir("/path/to/Skywork-Reward-Llama-3.1-8B", mesh=mesh)
    scores = reward_model.score(params, config, tokens, positions, valid)  # [B] float32
    reward_model.save_hf_dir(params, config, "/tmp/rm")  # AutoModelForSequenceClassification

A sequence classifier (transformers' ``GenericForSequenceClassification``: Llama / Qwen2 / Qwen3 /
Qwen3-MoE ``*ForSequenceClassification``) is the causal LM's decoder trunk (the same ``model.*``
tensors) with a bias-free Linear ``score`` [num_labels, E] instead of the vocabulary head; a
reward model has num_labels 1. The reward of row b is

    r_b = h_b[i_b] . w,   h = the trunk's final-normed hidden states [B, T, E]
                          (trustrl.model.transformer.forward), w = score.weight[0] [E],
    i_b = argmax_t  t * keep[b, t],   keep = valid & (tokens != pad_token_id)

i.e. the rightmost valid token that is not the pad token. That is transformers' pooling
(transformers 5.25 ``GenericForSequenceClassification.forward``: ``argmax(arange(T) *
(input_ids != pad_token_id))``, "to handle both left- and right- padding") with trustrl's
``valid`` mask added, which changes nothing where padding slots hold pad_token_id (as in
transformers' batches) and keeps trustrl's padding slots (any token) out. A row whose content
ends with the pad token (pad == eos, a response ending with eos) pools at the token before it,
as transformers does; a row with no such token pools at column 0 (argmax of zeros, as there).
With ``pad_token_id`` None transformers refuses batches of more than one row (and takes column
-1); trustrl pools at each row's last valid token. Only the pooled [B, E] rows meet the head,
in float32 (the hidden state is in the compute dtype): no [B, T] scores are formed.

Config (config.json, read as transformers' ``PreTrainedConfig`` reads it): ``architectures``
one of ARCHITECTURES (a ``*ForCausalLM`` fails: a causal LM, not a reward model; without
``architectures``, ``model_type`` picks it, as the Auto classes do); the number of labels is
``num_labels`` when given (transformers then rewrites ``id2label``), else len(``id2label``),
else transformers' default 2, and must be 1; ``pad_token_id`` as given (None when absent, the
Llama / Qwen config classes' default). The trunk's fields go through
``trustrl.model.hf.config_from_hf`` as the family's causal LM's.

Params: ``{"model": <the trunk>, "score": [E, 1]}``. The trunk is trustrl's Transformer params for
``config.model``, whose ``tie_word_embeddings`` is True only so that no vocabulary head
(``lm_head``) is created (a classifier has none; the flag changes nothing else in the trunk,
and the export writes ``tie_word_embeddings: false``); scanned layers are stacked as usual.
``score`` is HF's ``score.weight`` transposed, stored in ``param_dtype`` like the trunk and
replicated on a mesh (E numbers); the trunk is sharded by ``transformer.param_shardings``.
New heads (``init_params``, ``from_policy``) are drawn from N(0, 0.02^2): transformers'
``_init_weights`` for nn.Linear with the configs' ``initializer_range`` default 0.02.

Precision: bf16 parameters and compute by default (``param_dtype`` / ``dtype``), float32 for
parity tests. ``score_program`` jits ``score`` with the batch over the mesh's data axes; call
it (and ``.lower`` it) under ``jax.set_mesh(mesh)``, as the trainer's programs run, so that
"auto" attention resolves for the mesh's platform.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from trustrl.infra import sharding as sharding_lib
from trustrl.model import hf
from trustrl.model import transformer

# architecture name in config.json -> model family (= model_type for these four)
ARCHITECTURES = {
    "LlamaForSequenceClassification": "llama",
    "Qwen2ForSequenceClassification": "qwen2",
    "Qwen3ForSequenceClassification": "qwen3",
    "Qwen3MoeForSequenceClassification": "qwen3_moe",
}
SCORE = "score.weight"  # HF's reward head [num_labels = 1, E]
INIT_STD = 0.02  # transformers' initializer_range default (nn.Linear init of a new score head)


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
    """A reward model: its trunk (no vocabulary head is created), architecture and pad token.
    Frozen and hashable, so it can be a static jit argument."""
    model: transformer.ModelConfig  # the trunk's config (tie_word_embeddings True: no lm_head)
    architecture: str  # one of ARCHITECTURES
    pad_token_id: int | None  # from config.json, as transformers reads it

    def __post_init__(self):
        if ARCHITECTURES.get(self.architecture) != self.model.family:
            raise ValueError(f"architecture {self.architecture!r} does not go with model family "
                             f"{self.model.family!r}; valid: {ARCHITECTURES}")
        if not self.model.tie_word_embeddings:
            raise ValueError("a reward model's trunk config has tie_word_embeddings=True (so no "
                             "lm_head is created); use dataclasses.replace")


# ----------------------------------------------------------------------------- config.json


def _architecture(hf_cfg: dict, source: str) -> str:
    archs = hf_cfg.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is not None:
        return arch
    if any(str(a).endswith("ForCausalLM") for a in archs):
        raise ValueError(f"{source}: architectures {archs} is a causal LM, not a reward model: "
                         f"expected a *ForSequenceClassification, one of {sorted(ARCHITECTURES)} "
                         f"(reward_model.from_policy starts a reward model from a causal LM)")
    if not archs:  # as transformers' Auto classes: by model_type
        arch = {fam: a for a, fam in ARCHITECTURES.items()}.get(hf_cfg.get("model_type"))
    if arch is None:
        what = (f"architecture {archs!r}" if archs else
                f"model_type {hf_cfg.get('model_type')!r} (no 'architectures' given)")
        raise ValueError(f"unsupported {what} in {source}; supported reward models: "
                         f"{sorted(ARCHITECTURES)}")
    return arch


def num_labels(hf_cfg: dict) -> tuple[int, str]:
    """(number of labels, where it came from) as transformers 5.25's config loading reads it:
    ``num_labels`` when given (it then rewrites id2label), else len(``id2label``), else 2."""
    if hf_cfg.get("num_labels") is not None:
        return int(hf_cfg["num_labels"]), "'num_labels'"
    if isinstance(hf_cfg.get("id2label"), dict):
        return len(hf_cfg["id2label"]), "the length of 'id2label'"
    return 2, "transformers' default when neither 'num_labels' nor 'id2label' is given"


def config_from_hf(hf_cfg: dict, *, param_dtype="bfloat16", dtype="bfloat16",
                   remat=transformer.ModelConfig.remat,
                   source: str = "config.json") -> RewardModelConfig:
    """RewardModelConfig from a parsed config.json; errors name ``source`` and the field."""
    arch = _architecture(hf_cfg, source)
    n, how = num_labels(hf_cfg)
    if n != 1:
        raise ValueError(f"{source}: num_labels is {n} ({how}); a reward model has one score: "
                         f"num_labels 1 (id2label {{\"0\": \"LABEL_0\"}})")
    pad = hf_cfg.get("pad_token_id")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int)):
        raise ValueError(f"{source}: pad_token_id must be an integer or null, got {pad!r}")
    family = ARCHITECTURES[arch]
    causal = next(a for a, (fam, _) in hf.ARCHITECTURES.items() if fam == family)
    model = hf.config_from_hf({**hf_cfg, "architectures": [causal]}, param_dtype=param_dtype,
                              dtype=dtype, remat=remat, source=source)
    return RewardModelConfig(dataclasses.replace(model, tie_word_embeddings=True), arch, pad)


def config_to_hf(config: RewardModelConfig) -> dict:
    """config.json contents: the trunk's (hf.config_to_hf) as a one-label sequence classifier,
    with id2label / label2id as transformers writes them and the pad token."""
    out = hf.config_to_hf(config.model)
    out.update(architectures=[config.architecture], tie_word_embeddings=False,
               id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
               pad_token_id=config.pad_token_id)
    return out


def read_config(path: str, *, param_dtype="bfloat16", dtype="bfloat16") -> RewardModelConfig:
    """RewardModelConfig from ``path``/config.json."""
    hf_cfg, cfg_file = hf.config_json(path)
    return config_from_hf(hf_cfg, param_dtype=param_dtype, dtype=dtype, source=cfg_file)


# ----------------------------------------------------------------------------- params


def param_shapes(config: RewardModelConfig):
    """Pytree of jax.ShapeDtypeStruct of the params; no computation."""
    e = config.model.hidden_size
    return {"model": transformer.param_shapes(config.model),
            "score": jax.ShapeDtypeStruct((e, 1), jnp.dtype(config.model.param_dtype))}


def param_shardings(config: RewardModelConfig, mesh, rules=sharding_lib.LOGICAL_RULES):
    """NamedShardings of the params: the trunk's by ``transformer.param_shardings``, the score
    head replicated."""
    return {"model": transformer.param_shardings(config.model, mesh, rules),
            "score": NamedSharding(mesh, P())}


def abstract_params(config: RewardModelConfig, mesh=None, rules=sharding_lib.LOGICAL_RULES):
    """The params as ShapeDtypeStructs (with their shardings when ``mesh``): what a compile-only
    check (trustrl.tools.aot_check) lowers ``score_program`` on, without weights."""
    shapes = param_shapes(config)
    if mesh is None:
        return shapes
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, param_shardings(config, mesh, rules))


def _new_head(config: RewardModelConfig, rng, mesh=None):
    """A fresh score head [E, 1] ~ N(0, INIT_STD^2) in param_dtype (replicated on ``mesh``)."""
    w = (INIT_STD * jax.random.normal(rng, (config.model.hidden_size, 1), jnp.float32)).astype(
        config.model.param_dtype)
    return w if mesh is None else jax.device_put(w, NamedSharding(mesh, P()))


def init_params(config: RewardModelConfig, rng, mesh=None, rules=sharding_lib.LOGICAL_RULES):
    """Random params: the trunk as ``transformer.init_params`` (sharded on ``mesh``), a new
    score head."""
    k_model, k_score = jax.random.split(rng)
    return {"model": transformer.init_params(config.model, k_model, mesh, rules),
            "score": _new_head(config, k_score, mesh)}


def from_policy(model_cfg: transformer.ModelConfig, policy_params, rng, *,
                pad_token_id: int | None = None):
    """(RewardModelConfig, params) of a reward model on a policy's trunk: ``policy_params``
    (trustrl's, or ``hf.load_hf_dir``'s of a causal LM) without ``lm_head`` (a tied policy keeps
    its embedding, which is also the trunk's input) plus a new score head (``rng``; replicated
    on the mesh of the policy's embedding when that is sharded). The trunk's arrays are the
    policy's own, not copies; a tied policy's float32 head (``head_dtype``) embedding is cast to
    ``param_dtype``. A LoRA policy is merged first (trustrl.model.lora.merge / merged_config).
    """
    if model_cfg.lora_rank:
        raise ValueError("from_policy takes a merged policy: lora.merge(params, config) with "
                         "lora.merged_config(config)")
    arch = next(a for a, fam in ARCHITECTURES.items() if fam == model_cfg.family)
    trunk_cfg = dataclasses.replace(model_cfg, tie_word_embeddings=True, head_dtype="")
    config = RewardModelConfig(trunk_cfg, arch, pad_token_id)
    trunk = {k: v for k, v in policy_params.items() if k != "lm_head"}
    want = transformer.param_shapes(trunk_cfg)
    if jax.tree.structure(trunk) != jax.tree.structure(want):
        raise ValueError(f"from_policy: the policy params do not match model_cfg (params "
                         f"{sorted(policy_params)}, a trunk has {sorted(want)}; nested: "
                         f"{jax.tree.structure(trunk)} vs {jax.tree.structure(want)})")
    bad = [jax.tree_util.keystr(p) for (p, x), w in zip(jax.tree_util.tree_leaves_with_path(
        trunk), jax.tree.leaves(want)) if tuple(x.shape) != tuple(w.shape)]
    if bad:
        raise ValueError(f"from_policy: params {bad[:3]} have other shapes than model_cfg's")
    trunk = jax.tree.map(lambda x, w: x if x.dtype == w.dtype else x.astype(w.dtype), trunk, want)
    sh = getattr(trunk["embedding"], "sharding", None)
    mesh = sh.mesh if isinstance(sh, NamedSharding) else None
    return config, {"model": trunk, "score": _new_head(config, rng, mesh)}


# ----------------------------------------------------------------------------- scoring


def pooled_index(tokens, valid, pad_token_id: int | None = None):
    """[B] int32: each row's rightmost column that is valid and (pad_token_id given) not the pad
    token; 0 for a row with none (transformers' argmax(arange(T) * non_pad))."""
    keep = valid.astype(bool)
    if pad_token_id is not None:
        keep = keep & (tokens != pad_token_id)
    cols = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    return jnp.argmax(cols[None, :] * keep.astype(jnp.int32), axis=1).astype(jnp.int32)


def score(params, config: RewardModelConfig, tokens, positions, valid):
    """tokens, positions, valid [B, T] (the conventions of ``transformer.forward_logits``;
    attention uses ``valid``) -> rewards [B] float32: the score head on the final-normed hidden
    state at ``pooled_index`` (module docstring)."""
    hidden = transformer.forward(params["model"], config.model, tokens, positions, valid)
    idx = pooled_index(tokens, valid, config.pad_token_id)
    pooled = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]  # [B, E]
    out = jnp.dot(pooled.astype(jnp.float32), params["score"].astype(jnp.float32),
                  precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return out[:, 0]


def score_program(config: RewardModelConfig, mesh=None, rules=sharding_lib.LOGICAL_RULES):
    """jitted fn(params, tokens, positions, valid) -> [B] float32 (``score``). With ``mesh``:
    params in ``param_shardings``, tokens / positions / valid and the scores batch-sharded
    over the data axes (``sharding.batch_sharding``; B must divide over data x fsdp); call it
    under ``jax.set_mesh(mesh)``."""
    def run(params, tokens, positions, valid):
        return score(params, config, tokens, positions, valid)

    if mesh is None:
        return jax.jit(run)
    batch = sharding_lib.batch_sharding(mesh, 2)
    return jax.jit(run, in_shardings=(param_shardings(config, mesh, rules), batch, batch, batch),
                   out_shardings=sharding_lib.batch_sharding(mesh, 1))


# ----------------------------------------------------------------------------- load / save


def _weights_file(path: str) -> str:
    index = os.path.join(path, "model.safetensors.index.json")
    return index if os.path.exists(index) else os.path.join(path, "model.safetensors")


def load_hf_dir(path: str, *, mesh=None, rules=sharding_lib.LOGICAL_RULES,
                param_dtype="bfloat16", dtype="bfloat16"):
    """Loads a local ``*ForSequenceClassification`` directory -> (RewardModelConfig, params),
    sharded over ``mesh`` as it is read (hf.read_params: memory-mapped, one tensor at a time,
    each device pulling its slice; index-sharded checkpoints too). Errors name the file and the
    field or tensor: a causal LM (its config or its weights: lm_head.weight, no score.weight),
    num_labels != 1, a missing score.weight, wrong shapes."""
    config = read_config(path, param_dtype=param_dtype, dtype=dtype)
    files = hf.weight_files(path)
    if SCORE not in files:
        where = _weights_file(path)
        if "lm_head.weight" in files:
            raise ValueError(f"{where} holds lm_head.weight and no {SCORE}: a causal LM's "
                             f"weights, not a reward model's (expected *ForSequenceClassification "
                             f"weights: model.* + {SCORE} [1, hidden_size])")
        raise KeyError(f"{where} has no {SCORE} (the reward head [1, hidden_size] of a "
                       f"*ForSequenceClassification checkpoint)")
    plan = [(name, hf.Entry(("model",) + e.path, e.kind, e.expert))
            for name, e in hf.load_plan(config.model, files)]
    plan.append((SCORE, hf.Entry(("score",), "linear1")))
    hf.check_plan(path, config.model, plan, files)
    flat = dataclasses.replace(config, model=transformer.unrolled_config(config.model))
    shardings = None if mesh is None else param_shardings(flat, mesh, rules)
    raw = hf.read_params(path, plan, files, param_shapes(flat), shardings, param_dtype)
    trunk = transformer.stack_layers(raw["model"], config.model, mesh, rules)
    return config, {"model": trunk, "score": raw["score"]}


def save_hf_dir(params, config: RewardModelConfig, path: str, *, copy_from: str | None = None,
                max_shard_size: int | None = None) -> str:
    """Writes config.json (``config_to_hf``) + model.safetensors (the trunk's ``model.*`` tensors
    and ``score.weight`` [1, E], in the params' dtype) that
    ``transformers.AutoModelForSequenceClassification.from_pretrained`` loads with the same
    scores. ``copy_from``: a HF directory whose tokenizer / generation files are copied along;
    ``max_shard_size``: as ``hf.save_hf_dir``. Gathers the params to the host."""
    score_w = np.asarray(jax.device_get(params["score"]))
    if score_w.shape != (config.model.hidden_size, 1):
        raise ValueError(f"params['score'] has shape {score_w.shape}, expected "
                         f"({config.model.hidden_size}, 1)")
    tensors = hf.hf_tensors(params["model"], config.model)
    tensors[SCORE] = np.ascontiguousarray(score_w.T)
    return hf.write_hf_dir(path, tensors, config_to_hf(config), copy_from=copy_from,
                           max_shard_size=max_shard_size)
