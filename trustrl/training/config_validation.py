"""Start-up checks of a run, before anything is written: every bad value fails with a ValueError
that names the field and the valid choices.

* ``validate(cfg)``: the config alone (types, ranges, choices, fields that must agree).
* ``check_environment(cfg, workdir)``: what the config points at on this host (devices for the
  mesh, model / tokenizer / data directories, the workdir). Reads only.
Resuming a workdir (the config it recorded, what may change) is trustrl.training.resume.
"""
from __future__ import annotations

import json
import math
import os

from trustrl.core import advantages, losses
from trustrl.training import optim
from trustrl.data import datasets
from trustrl.infra import sharding
from trustrl.model import attention, moe, policy, transformer

OVERLONG = ("none", "filter", "penalty")
MAX_SEED = 2**32 - 1
# The smallest rollout temperature. Far below it logits / T overflow float32 and the log-probs
# that define mu stop being finite (1e-30 did in the tiny config; 1e-3 ran); long before that
# sampling is argmax decoding with log-probs of ~0, which no loss can learn from. Greedy
# decoding is the evaluation's argmax sampler, not a tiny temperature.
MIN_TEMPERATURE = 1e-3


def check_model_shape(num_heads: int, num_kv_heads: int, head_dim: int, where: str):
    """The attention shape a model needs (trustrl.model.transformer.ModelConfig's own checks,
    early)."""
    if num_heads % num_kv_heads:
        raise ValueError(f"{where}num_heads={num_heads} must be a multiple of {where}"
                         f"num_kv_heads={num_kv_heads} (grouped-query attention shares each kv "
                         f"head among num_heads / num_kv_heads query heads)")
    if head_dim % 2:
        raise ValueError(f"{where}head_dim={head_dim} must be even (rotary embeddings rotate "
                         f"pairs of dimensions)")


def _divergence(cfg) -> str:
    """The divergence source of cfg.loss.method (losses.METHODS), '' for an unknown method."""
    spec = losses.METHODS.get(cfg.loss.method)
    return spec.divergence if spec else ""


def check_vocab(cfg, vocab_size: int, source: str):
    """The sampling fields that need the vocabulary's size (``source`` names where it is from)."""
    r = cfg.rollout
    if r.top_k > vocab_size:
        raise ValueError(f"rollout.top_k={r.top_k} is larger than the vocabulary ({source} = "
                         f"{vocab_size}); valid: 0 (off) <= top_k <= {vocab_size}")
    if _divergence(cfg) == "topk" and r.record_topk > vocab_size:
        raise ValueError(f"rollout.record_topk={r.record_topk} is larger than the vocabulary "
                         f"({source} = {vocab_size}); valid: 1 <= K <= {vocab_size}")


def check_built(cfg, vocab_size: int, model_cfg, mesh):
    """The checks that need the built artefacts (tokenizer, model config, device mesh), run by
    experiment.build as soon as they exist, before any training. Raises ValueError."""
    check_vocab(cfg, vocab_size, "the tokenizer's vocabulary")
    if model_cfg.vocab_size < vocab_size:
        raise ValueError(f"the model's vocabulary ({model_cfg.vocab_size}) is smaller than the "
                         f"tokenizer's ({vocab_size})")
    check_model_shape(model_cfg.num_heads, model_cfg.num_kv_heads, model_cfg.head_dim, "model ")
    check_mesh_rows(cfg, dict(mesh.shape))
    where = "model.hf_dir's " if cfg.model.hf_dir else "model."
    if model_cfg.num_experts > 0:
        check_expert_split(model_cfg.num_experts, dict(mesh.shape), where)
    else:
        check_dense_model(cfg, f"the model ({where}num_experts=0) is dense")


# --- mixture of experts ------------------------------------------------------------------------

def check_dense_model(cfg, why: str):
    """The MoE-only fields of cfg.model must be off for a dense model (``why`` says it is)."""
    m = cfg.model
    if m.get("routing_replay", False):
        raise ValueError(f"model.routing_replay=True needs a mixture of experts, but {why}: there "
                         f"are no routed experts to record and replay; set "
                         f"model.routing_replay=False (or model.num_experts > 0)")
    for name, value, off in (("moe_impl", m.get("moe_impl", "ragged"), "ragged"),
                             ("moe_capacity_factor", m.get("moe_capacity_factor", 0.0), 0.0),
                             ("router_aux_loss_coef", m.get("router_aux_loss_coef", 0.0), 0.0)):
        if value != off:
            raise ValueError(f"model.{name}={value!r} applies to a mixture of experts only, but "
                             f"{why}; leave it at {off!r}")


def expert_split(mesh_shape: dict) -> tuple[tuple[str, ...], int]:
    """(mesh axes the logical 'expert' axis maps to in sharding.LOGICAL_RULES, their product in
    ``mesh_shape``): how many ways the experts of a layer are split."""
    axes = dict(sharding.LOGICAL_RULES).get("expert")
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return axes, math.prod(int(mesh_shape.get(a, 1)) for a in axes)


def check_expert_split(num_experts: int, mesh_shape: dict, where: str = "model."):
    """The experts of a layer must split evenly over the mesh axes of the 'expert' axis."""
    axes, split = expert_split(mesh_shape)
    if num_experts % split:
        named = " x ".join(f"mesh.{a}={int(mesh_shape.get(a, 1))}" for a in axes)
        raise ValueError(f"{where}num_experts={num_experts} is not divisible by the mesh's "
                         f"expert split ({named} = {split}: trustrl.infra.sharding.LOGICAL_RULES "
                         f"shards the 'expert' axis over {list(axes)}); valid: a mesh whose "
                         f"{' x '.join(axes)} divides {num_experts}")


def check_moe_shape(num_experts, k, layers, mlp_only_layers, where: str):
    """Top-k and the dense layers of a mixture of experts (``where`` prefixes the field names)."""
    if not 1 <= k <= num_experts:
        raise ValueError(f"{where}num_experts_per_tok={k} is "
                         + ("larger than" if k > num_experts else "not valid for")
                         + f" {where}num_experts={num_experts}: each token is routed to that "
                         f"many distinct experts; valid: 1 <= num_experts_per_tok <= "
                         f"{num_experts}")
    bad = [i for i in mlp_only_layers if not 0 <= i < layers]
    if bad:
        raise ValueError(f"{where}mlp_only_layers={list(mlp_only_layers)}: {bad} are not layers of "
                         f"the {layers}-layer model; valid: indices in [0, {layers - 1}]")


def _check_lora(cfg):
    """cfg.model.lora (config alone): rank 0 is off; with rank >= 1 the other fields."""
    from trustrl.model import lora
    spec = cfg.model.get("lora")
    if spec is None:
        return
    _int(cfg, "model.lora.rank", 0)
    _typed(cfg, ("model.lora.init", "model.lora.base_quant", "model.lora.init_from"), str)
    if spec.rank == 0:
        if tuple(spec.get("targets", ())) or spec.get("init_from", ""):
            raise ValueError(f"model.lora.rank=0 turns LoRA off, but model.lora.targets="
                             f"{tuple(spec.targets)} / init_from={spec.init_from!r} are set: "
                             f"give model.lora.rank >= 1 (and alpha > 0), or clear them")
        return
    _float(cfg, "model.lora.alpha", 0, open_low=True)
    targets = _get(cfg, "model.lora.targets")
    if isinstance(targets, str) or not isinstance(targets, (list, tuple)):
        raise ValueError(f"model.lora.targets must be a tuple of projection names, got "
                         f"{targets!r}; valid names: {tuple(lora.TARGETS)}")
    lora.check_config(spec.rank, spec.alpha, tuple(targets), spec.init)
    _choice("model.lora.base_quant", spec.base_quant, ("", "int8", "fp8"))  # int4: not tested


def _check_moe(cfg):
    """The MoE fields of cfg.model (config alone)."""
    m = cfg.model
    _choice("model.moe_impl", m.moe_impl, moe.IMPLS)
    _float(cfg, "model.moe_capacity_factor", 0)
    if (m.moe_impl == "capacity") != (m.moe_capacity_factor > 0):
        raise ValueError(
            f"model.moe_capacity_factor={m.moe_capacity_factor} with model.moe_impl="
            f"{m.moe_impl!r}: a capacity factor (> 0) goes with moe_impl='capacity' and only "
            f"with it; valid: moe_impl='capacity' with moe_capacity_factor > 0, or another "
            f"moe_impl with moe_capacity_factor=0")
    _float(cfg, "model.router_aux_loss_coef", 0)
    _typed(cfg, ("model.routing_replay", "model.norm_topk_prob"), bool)
    if m.hf_dir:  # the checkpoint's shape: _check_hf_config and check_built
        return
    _int(cfg, "model.num_experts", 0)
    if m.num_experts == 0:
        check_dense_model(cfg, "the model is dense (model.num_experts=0)")
        return
    _int(cfg, "model.num_experts_per_tok", 0)
    for k in ("moe_intermediate_size", "decoder_sparse_step"):
        _int(cfg, f"model.{k}", 1)
    layers = _get(cfg, "model.mlp_only_layers")
    if (not isinstance(layers, (list, tuple))
            or any(isinstance(i, bool) or not isinstance(i, int) for i in layers)):
        raise ValueError(f"model.mlp_only_layers must be a tuple of layer indices (ints), got "
                         f"{layers!r}")
    check_moe_shape(m.num_experts, m.num_experts_per_tok, m.num_layers, layers, "model.")
    sizes = _mesh_sizes(cfg)
    if None not in sizes.values():  # else check_built checks it on the device mesh
        check_expert_split(m.num_experts, sizes)


def check_mesh_rows(cfg, mesh_shape: dict):
    """rollout.max_rows against the mesh's batch axes (data x fsdp), once -1 is resolved."""
    shards = int(mesh_shape.get("data", 1)) * int(mesh_shape.get("fsdp", 1))
    if cfg.rollout.max_rows and cfg.rollout.max_rows % shards:
        raise ValueError(f"rollout.max_rows={cfg.rollout.max_rows} is not divisible by the "
                         f"mesh's batch axes (data x fsdp = {shards} with mesh {mesh_shape}); "
                         f"each call's rows are split over them")


def score_microbatches(cfg) -> int:
    """Parts of the score pass: train.score_microbatches, or (0) minibatches x microbatches, so
    the score program holds as many rows at once as a train micro-batch."""
    n = int(cfg.train.get("score_microbatches", 0))
    return n or int(cfg.train.minibatches) * int(cfg.train.microbatches)


def _mesh_sizes(cfg) -> dict:
    """{axis: size} of cfg.mesh, None for a -1 (known only with the devices)."""
    return {a: (None if int(v) == -1 else int(v)) for a, v in cfg.mesh.items()}


def _batch_shards(cfg) -> int | None:
    """data x fsdp of cfg.mesh, or None when one of them is -1 (known only with the devices)."""
    sizes = [int(cfg.mesh[a]) for a in ("data", "fsdp")]
    return None if -1 in sizes else sizes[0] * sizes[1]


def _choice(name, value, valid):
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(valid)}")


def _get(cfg, name):
    node = cfg
    for part in name.split("."):
        if part not in node:
            raise ValueError(f"the config has no field {name!r}")
        node = node[part]
    return node


def _int(cfg, name, low=None):
    """cfg[name] must be an int (not a bool, not a float such as 2.5) and >= low."""
    v = _get(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an int, got {v!r} ({type(v).__name__})")
    if low is not None and v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v}")
    return v


def _float(cfg, name, low=None, high=None, *, open_low=False, open_high=False, inf_ok=False):
    """cfg[name] must be a finite number (inf too when inf_ok) in the given interval."""
    v = _get(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be a number, got {v!r} ({type(v).__name__})")
    if math.isnan(v) or (math.isinf(v) and not inf_ok):
        raise ValueError(f"{name} must be finite, got {v}")
    below = low is not None and (v <= low if open_low else v < low)
    above = high is not None and (v >= high if open_high else v > high)
    if below or above:
        lo = "(-inf" if low is None else f"{'(' if open_low else '['}{low}"
        hi = "inf)" if high is None else f"{high}{')' if open_high else ']'}"
        raise ValueError(f"{name} must be in {lo}, {hi}, got {v}")
    return v


def _check_mesh_sizes(cfg, group: str, what: str):
    """cfg.<group>'s data / fsdp / tensor: positive ints, at most one -1 (filled in later)."""
    sizes = [_get(cfg, f"{group}.{a}") for a in ("data", "fsdp", "tensor")]
    if (any(isinstance(v, bool) or not isinstance(v, int) for v in sizes)
            or sum(v == -1 for v in sizes) > 1 or any(v == 0 or v < -1 for v in sizes)):
        raise ValueError(f"{what} must be positive ints with at most one -1, got "
                         f"{dict(cfg[group])}")


def _typed(cfg, names, kind):
    for name in names:
        v = _get(cfg, name)
        if not isinstance(v, kind):
            raise ValueError(f"{name} must be a {kind.__name__}, got {v!r} ({type(v).__name__})")


def validate(cfg):
    """Checks the config alone; raises ValueError naming the first bad field."""
    from trustrl.data import datasets as data, rewards  # the dataset and task registries
    _choice("loss.method", cfg.loss.method, losses.METHODS)
    _choice("loss.agg", cfg.loss.agg, losses.AGGREGATIONS)
    _choice("loss.advantage", cfg.loss.advantage, tuple(advantages.ADVANTAGE_FNS))
    _choice("loss.trm_divergence", cfg.loss.trm_divergence, ("binary_tv", "binary_kl"))
    for k in ("delta_low", "delta_high"):
        _float(cfg, f"loss.{k}", 0, open_low=True)
    _float(cfg, "loss.is_cap", 0, open_low=True, inf_ok=True)
    if losses.METHODS[cfg.loss.method].needs_alpha:
        _float(cfg, "loss.alpha", 0, 1, open_low=True)
    # the method's own parameters (losses.PARAMS): ranges and low < high, named as loss.<name>
    losses.check_params({k: _get(cfg, f"loss.{k}") for k in losses.METHODS[cfg.loss.method].params},
                        where="loss.")
    _choice("rollout.dtype", cfg.rollout.dtype, policy.ROLLOUT_DTYPES)
    _choice("rollout.head_dtype", cfg.rollout.head_dtype, policy.HEAD_DTYPES)
    _choice("model.dtype", cfg.model.dtype, transformer.DTYPES)
    _choice("model.param_dtype", cfg.model.param_dtype, transformer.DTYPES)
    _choice("model.attention", cfg.model.attention, attention.BACKENDS)
    _choice("warmstart.dtype", cfg.warmstart.dtype, ("",) + transformer.DTYPES)
    _choice("rollout.overlong", cfg.rollout.overlong, OVERLONG)
    _choice("task.template", cfg.task.template, datasets.TEMPLATES)
    _choice("task.name", cfg.task.name, tuple(rewards.TASKS))
    _typed(cfg, ("model.hf_dir", "tokenizer.path", "task.operations", "task.data_dir",
                 "task.manual_dir", "warmstart.cache_dir"), str)
    _typed(cfg, ("model.tie_word_embeddings", "model.remat", "tokenizer.split_digits",
                 "rollout.dynamic_sampling", "rollout.continuous", "train.score_pass",
                 "rollout.keep_kv_cache",
                 "log.tensorboard", "log.progress"), bool)

    for k in ("seed", "task.seed", "warmstart.seed"):  # numpy / tfds seeds: [0, 2**32)
        _int(cfg, k, 0)
        if _get(cfg, k) > MAX_SEED:
            raise ValueError(f"{k} must be an int in [0, {MAX_SEED}] (numpy's seed range), got "
                             f"{_get(cfg, k)}")
    if not cfg.model.hf_dir:  # built from these fields (a pretrained model brings its own)
        for k in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                  "head_dim"):
            _int(cfg, f"model.{k}", 1)
        _float(cfg, "model.rope_theta", 0, open_low=True)
        check_model_shape(cfg.model.num_heads, cfg.model.num_kv_heads, cfg.model.head_dim,
                          "model.")
    if not (cfg.tokenizer.path or cfg.model.hf_dir):  # the BPE trained for the run
        from trustrl.data.tokenizer import DEFAULT_SPECIAL_TOKENS
        _int(cfg, "tokenizer.vocab_size", 1)
        low = 256 + len(DEFAULT_SPECIAL_TOKENS)
        if cfg.tokenizer.vocab_size < low:
            raise ValueError(f"tokenizer.vocab_size={cfg.tokenizer.vocab_size} is below the "
                             f"trained BPE's 256 byte symbols + {len(DEFAULT_SPECIAL_TOKENS)} "
                             f"special tokens = {low}; valid: >= {low}")

    t = cfg.task
    if t.name in data.SYNTHETIC_TASKS:  # the generator's own limits (difficulty, operators)
        from trustrl.data import tasks
        _int(cfg, "task.difficulty", 1)
        try:
            tasks.check_task(t.name, t.difficulty, t.operations)
        except ValueError as e:
            raise ValueError(f"task.difficulty={t.difficulty}, task.operations="
                             f"{t.operations!r}: {e}") from None
    if "://" in t.data_dir:
        raise ValueError(f"task.data_dir={t.data_dir!r}: the tfds dataset is built with local "
                         f"file writers, so task.data_dir must be a local path; leave it empty "
                         f"to build it in the workdir (for a gs:// workdir, on the host's local "
                         f"disk, see trustrl.infra.storage.local_dir)")
    layouts = {**data.MATH_LAYOUTS, **data.PROMPT_LAYOUTS}  # the sets read from files
    if t.name in layouts:
        if not t.manual_dir:
            raise ValueError(f"task.name={t.name!r} reads downloaded files: set task.manual_dir "
                             f"to their directory (layout: {layouts[t.name]})")
        _int(cfg, "task.num_test", 0)  # the held-out size when the files have no test split
    else:
        _int(cfg, "task.difficulty", 1)
        _int(cfg, "task.num_train", 1)
        _int(cfg, "task.num_test", 1)  # the held-out problems every eval reads
    _float(cfg, "task.reward_correct")
    _float(cfg, "task.reward_wrong")
    if not t.reward_correct > t.reward_wrong:
        raise ValueError(f"task.reward_correct ({t.reward_correct}) must be greater than "
                         f"task.reward_wrong ({t.reward_wrong})")
    _int(cfg, "task.filler_words", 0)
    if t.filler_words:
        _float(cfg, "task.filler_zipf", 0, open_low=True)
        _int(cfg, "task.filler_min", 0)
        _int(cfg, "task.filler_max", 0)
        if not 0 <= t.filler_min <= t.filler_max:
            raise ValueError(f"need 0 <= task.filler_min <= task.filler_max, got "
                             f"{t.filler_min}, {t.filler_max}")
    _int(cfg, "task.filter_samples", 0)
    if t.filter_samples:
        _int(cfg, "task.filter_pool", 1)
        _float(cfg, "task.solve_band_low")
        _float(cfg, "task.solve_band_high")
        if not 0 <= t.solve_band_low <= t.solve_band_high <= 1:
            raise ValueError(f"need 0 <= task.solve_band_low <= task.solve_band_high <= 1, got "
                             f"{t.solve_band_low}, {t.solve_band_high}")

    w = cfg.warmstart
    _int(cfg, "warmstart.steps", 0)
    if w.steps and cfg.model.hf_dir:
        raise ValueError("warmstart.steps > 0 with model.hf_dir: the warm start is for models "
                         "trained from scratch; set warmstart.steps=0 for a pretrained model")
    if w.steps:
        _int(cfg, "warmstart.batch_size", 1)
        _float(cfg, "warmstart.learning_rate", 0, open_low=True)
        _float(cfg, "warmstart.target_loss", 0)

    r = cfg.rollout
    for k in ("prompts_per_iter", "max_new_tokens"):
        _int(cfg, f"rollout.{k}", 1)
    _int(cfg, "rollout.group_size", 1)
    if r.group_size < 2:  # every advantage in ADVANTAGE_FNS is relative to the group
        why = ("rloo's leave-one-out baseline divides by group_size - 1"
               if cfg.loss.advantage == "rloo" else
               "the advantage is relative to the group's other responses, so groups of 1 have "
               "zero advantages and give no gradient")
        raise ValueError(f"rollout.group_size must be >= 2 with loss.advantage="
                         f"{cfg.loss.advantage!r}, got {r.group_size}: {why}")
    _float(cfg, "rollout.temperature", 0, open_low=True)
    if r.temperature < MIN_TEMPERATURE:
        raise ValueError(f"rollout.temperature={r.temperature:g} is below {MIN_TEMPERATURE:g}: "
                         f"logits / T then overflow (the rollout log-probs that define mu are "
                         f"not finite) and sampling is argmax; valid: >= {MIN_TEMPERATURE:g}")
    _float(cfg, "rollout.top_p", 0, 1, open_low=True)
    _int(cfg, "rollout.top_k", 0)
    _int(cfg, "rollout.record_topk", 0)
    if _divergence(cfg) == "topk" and r.record_topk < 1:
        raise ValueError(f"{cfg.loss.method} needs rollout.record_topk >= 1 (K of mu's top-K)")
    if not (cfg.tokenizer.path or cfg.model.hf_dir):  # else checked against the files' vocab
        check_vocab(cfg, cfg.tokenizer.vocab_size, "tokenizer.vocab_size")
    _int(cfg, "rollout.max_refill_rounds", 0)
    _int(cfg, "rollout.max_rows", 0)
    _int(cfg, "rollout.refill_rows", 0)
    if r.overlong == "penalty":
        _float(cfg, "rollout.overlong_penalty")

    _float(cfg, "optim.learning_rate", 0, open_low=True)
    _int(cfg, "optim.warmup_steps", 0)
    _float(cfg, "optim.b1", 0, 1, open_high=True)
    _float(cfg, "optim.b2", 0, 1, open_high=True)
    _float(cfg, "optim.weight_decay", 0)
    _float(cfg, "optim.grad_clip", 0)
    _choice("optim.schedule", cfg.optim.schedule, optim.SCHEDULES)
    _float(cfg, "optim.final_lr_frac", 0, 1)

    for k in ("iterations", "epochs", "minibatches"):
        _int(cfg, f"train.{k}", 1)
    batch = r.prompts_per_iter * r.group_size
    if batch % cfg.train.minibatches:
        raise ValueError(f"prompts_per_iter * group_size = {batch} is not divisible by "
                         f"train.minibatches={cfg.train.minibatches}")
    _int(cfg, "train.microbatches", 1)
    if (batch // cfg.train.minibatches) % cfg.train.microbatches:
        raise ValueError(f"a minibatch of {batch // cfg.train.minibatches} sequences "
                         f"(prompts_per_iter * group_size / train.minibatches) is not divisible "
                         f"by train.microbatches={cfg.train.microbatches}")
    _int(cfg, "train.score_microbatches", 0)
    if batch % score_microbatches(cfg):
        raise ValueError(f"prompts_per_iter * group_size = {batch} is not divisible by "
                         f"train.score_microbatches={cfg.train.score_microbatches}")
    _int(cfg, "eval.every", 0)
    if cfg.eval.every:
        _int(cfg, "eval.num_prompts", 1)
        _int(cfg, "eval.k", 1)
    _int(cfg, "checkpoint.every", 0)
    # 0 would keep no checkpoint: a rerun would silently start over and append to metrics.jsonl
    _int(cfg, "checkpoint.max_to_keep", 1)

    _check_mesh_sizes(cfg, "mesh", "mesh sizes")
    shards = _batch_shards(cfg)
    if cfg.rollout.max_rows and shards and cfg.rollout.max_rows % shards:
        raise ValueError(f"rollout.max_rows={cfg.rollout.max_rows} is not divisible by the "
                         f"mesh's batch axes (data x fsdp = {shards}); each call's rows are "
                         f"split over them")
    _check_mismatch(cfg)
    _check_async(cfg)
    _check_moe(cfg)  # after the mesh: the expert split needs its sizes
    _check_lora(cfg)
    _check_env(cfg)
    _check_reward_model(cfg, data)


def _check_mismatch(cfg):
    """The mismatch dial (rollout.mismatch.*, rollout.mu; trustrl.rollout.mismatch): ranges,
    settings that would do nothing, and combinations whose mu would be inconsistent."""
    from trustrl.rollout import mismatch
    _choice("rollout.mu", cfg.rollout.mu, mismatch.MU_SOURCES)
    _float(cfg, "rollout.mismatch.noise", 0)
    _int(cfg, "rollout.mismatch.staleness", 0)
    _typed(cfg, ("rollout.mismatch.pre_temperature", "rollout.mismatch.top_p_renorm"), bool)
    r, d, method = cfg.rollout, mismatch.settings(cfg), cfg.loss.method
    if d["pre_temperature"] and r.temperature == 1:
        raise ValueError("rollout.mismatch.pre_temperature=True with rollout.temperature=1: the "
                         "log-probs before and after the temperature are the same, the trap "
                         "would do nothing; set rollout.temperature != 1")
    if d["top_p_renorm"] and not (r.top_p < 1 or r.top_k > 0):
        raise ValueError("rollout.mismatch.top_p_renorm=True without truncation: set "
                         "rollout.top_p < 1 or rollout.top_k > 0 (the renormalised "
                         "distribution is the full softmax otherwise)")
    if d["top_p_renorm"] and _divergence(cfg) == "topk":
        raise ValueError(f"rollout.mismatch.top_p_renorm=True with loss.method={method!r}: the "
                         f"renormalised mu is -inf outside the top-p set, so its top-K cannot be "
                         f"recorded; use a per-token method")
    if mismatch.corrupts_mu(cfg) and _divergence(cfg) == "full":
        raise ValueError(f"rollout.mismatch noise / traps with loss.method={method!r}: the "
                         f"full-vocabulary methods recompute mu from the rollout parameters, "
                         f"which cannot see the sampler-side noise or traps; use precision "
                         f"(rollout.dtype) or staleness, or a binary / top-K method")
    if r.mu == "rescored":
        if mismatch.corrupts_mu(cfg):
            raise ValueError("rollout.mu='rescored' replaces mu by the trainer's forward, so "
                             "rollout.mismatch.noise / pre_temperature / top_p_renorm would "
                             "only change sampling, unrecorded; turn them off or use "
                             "rollout.mu='sampler'")
        if _divergence(cfg) in ("topk", "full"):
            raise ValueError(f"rollout.mu='rescored' rescores the sampled tokens only; "
                             f"loss.method={method!r} reads mu's {_divergence(cfg)} "
                             f"distribution; use a binary / per-token method or "
                             f"rollout.mu='sampler'")


def _check_async(cfg):
    """train.mode, the staleness bound, the sync period and sampler_mesh
    (trustrl.training.async_rollouts): ranges, and what a split layout does not support."""
    from trustrl.training import async_rollouts
    t = cfg.train
    _choice("train.mode", t.mode, async_rollouts.MODES)
    _int(cfg, "train.max_staleness", 0)
    _int(cfg, "train.sync_every", 1)
    chunk = _int(cfg, "train.partial_rollouts", 0)
    _float(cfg, "train.emulate_sample_s", 0)
    _float(cfg, "train.emulate_train_s", 0)
    n = _float(cfg, "sampler_mesh.devices", 0)
    if n >= 1 and n != int(n):
        raise ValueError(f"sampler_mesh.devices={n} must be a device count (a whole number) "
                         f"or a fraction of the devices in (0, 1)")
    _check_mesh_sizes(cfg, "sampler_mesh", "sampler_mesh sizes (data, fsdp, tensor)")
    _choice("train.rollout_version", t.rollout_version, async_rollouts.VERSIONS)
    replicas = _int(cfg, "sampler_mesh.replicas", 1)
    if replicas > 1:
        if not n:
            raise ValueError(f"sampler_mesh.replicas={replicas} needs a split layout "
                             f"(sampler_mesh.devices > 0): the replicas share its devices")
        if cfg.rollout.prompts_per_iter % replicas:
            raise ValueError(f"rollout.prompts_per_iter={cfg.rollout.prompts_per_iter} is not "
                             f"divisible by sampler_mesh.replicas={replicas} (each replica "
                             f"samples the same number of prompts)")
        if cfg.rollout.dynamic_sampling:
            raise ValueError(f"rollout.dynamic_sampling=True is not supported with sampler_mesh."
                             f"replicas={replicas}: its refill rounds decide on every "
                             f"replica's rewards; valid: sampler_mesh.replicas=1")
    if t.mode != "async" and t.rollout_version != "newest":
        raise ValueError(f"train.rollout_version={t.rollout_version!r} applies to train.mode="
                         f"'async' only; a sync run rolls out with the current parameters")
    if t.mode == "async":
        if not n:
            raise ValueError("train.mode='async' needs sampler_mesh.devices > 0: the devices "
                             "(a count, or a fraction in (0, 1)) the sampler runs on while the "
                             "trainer updates on the rest")
        if t.max_staleness < t.sync_every - 1:
            raise ValueError(f"train.max_staleness={t.max_staleness} is below train.sync_every"
                             f"={t.sync_every} - 1: between two syncs the sampler's parameters "
                             f"fall sync_every - 1 iterations behind, so it would wait for ever")
        spec = losses.method_spec(cfg.loss.method)
        if t.max_staleness > 0 and spec.needs_old_logp:
            mu_anchored = [m for m, s in losses.METHODS.items() if not s.needs_old_logp]
            raise ValueError(
                f"loss.method={cfg.loss.method!r} with train.mode='async' and train.max_"
                f"staleness={t.max_staleness}: its pi_old is recomputed at the trainer's "
                f"current parameters, which are not the parameters that sampled a stale "
                f"rollout, so its old log-probs are undefined there; use a mu-anchored method "
                f"({', '.join(mu_anchored)}) or train.max_staleness=0")
        if chunk:
            if chunk >= cfg.rollout.max_new_tokens:
                raise ValueError(f"train.partial_rollouts={chunk} must be below rollout."
                                 f"max_new_tokens={cfg.rollout.max_new_tokens} (the tokens "
                                 f"per segment; 0 turns partial rollouts off)")
            for field, on in (("rollout.dynamic_sampling", cfg.rollout.dynamic_sampling),
                              ("model.num_experts", bool(cfg.model.get("num_experts", 0))),
                              ("loss.method", _divergence(cfg) == "full")):
                if on:
                    raise ValueError(
                        f"train.partial_rollouts={chunk} is not supported with {field}="
                        f"{_get(cfg, field)!r}: " + {
                            "rollout.dynamic_sampling": "its refill rounds would mix "
                                                        "rollouts of several segments",
                            "model.num_experts": "the routed experts (R3) of a re-prefilled "
                                                 "prefix are not recorded",
                            "loss.method": "the full-vocabulary methods recompute mu from "
                                           "one version's parameters"}[field])
    elif chunk:
        raise ValueError(f"train.partial_rollouts={chunk} applies to train.mode='async' only")
    if t.mode != "async" and t.sync_every != 1:
        raise ValueError(f"train.sync_every={t.sync_every} applies to train.mode='async' only; "
                         f"a sync run rolls out with the current parameters every iteration")
    if not n:
        return
    unsupported = [("env.id", bool(cfg.get("env", {}).get("id", ""))),
                   ("reward_model.hf_dir", bool(cfg.get("reward_model", {}).get("hf_dir", ""))),
                   ("rollout.mismatch.staleness", bool(cfg.rollout.mismatch.staleness)),
                   ("rollout.mu", cfg.rollout.mu != "sampler")]
    for field, on in unsupported:
        if on:
            raise ValueError(f"{field}={_get(cfg, field)!r} is not supported with a split layout "
                             f"(sampler_mesh.devices={n}, train.mode={t.mode!r}) yet"
                             + ("; train.max_staleness is the split layout's staleness"
                                if field == "rollout.mismatch.staleness" else ""))


def _check_reward_model(cfg, data):
    """cfg.reward_model (config alone; the directory's config.json is read when the run is
    built, trustrl.reward_model.read_config names a bad one): the choices and ranges, and that a
    task without a verifier (a preference prompt set) has a reward model."""
    from trustrl.training import rlhf
    rm = cfg.get("reward_model")
    if rm is None or not rm.get("hf_dir", ""):
        if cfg.task.name in getattr(data, "PREFERENCE_DATASETS", ()):
            raise ValueError(f"task.name={cfg.task.name!r} has no verifier: its prompts are "
                             f"scored by a reward model; set reward_model.hf_dir to a Hugging "
                             f"Face *ForSequenceClassification directory")
        return
    _typed(cfg, ("reward_model.hf_dir", "reward_model.tokenizer", "reward_model.dtype",
                 "reward_model.template", "reward_model.truncation", "reward_model.normalize"),
           str)
    from trustrl.model.transformer import DTYPES
    _choice("reward_model.dtype", rm.dtype, DTYPES)
    _choice("reward_model.template", rm.template, rlhf.TEMPLATES)
    _choice("reward_model.truncation", rm.truncation, rlhf.TRUNCATION)
    _choice("reward_model.normalize", rm.normalize, rlhf.NORMALIZE)
    _int(cfg, "reward_model.max_length", 2)
    _int(cfg, "reward_model.batch_size", 0)
    _int(cfg, "reward_model.bucket", 1)
    for name in ("reward_model.clip", "reward_model.length_penalty", "reward_model.kl_coef"):
        _float(cfg, name, 0.0)
    if rm.kl_coef and not cfg.train.score_pass:
        raise ValueError("reward_model.kl_coef > 0 needs train.score_pass=True: the reference "
                         "policy's log-probs come from the trainer's scoring pass")
    if cfg.get("env", {}).get("id", ""):
        raise ValueError("reward_model.hf_dir is not supported with env.id (environment "
                         "episodes are rewarded by their environment)")
    if rm.batch_size and _batch_shards(cfg) and rm.batch_size % _batch_shards(cfg):
        raise ValueError(f"reward_model.batch_size={rm.batch_size} is not divisible by the "
                         f"mesh's batch axes (data x fsdp = {_batch_shards(cfg)})")


def _check_env(cfg):
    """cfg.env (config alone): id "" is the single-turn task; otherwise the episode fields, the
    id's source, a native id's name and, for GEM / reasoning-gym ids, that the `envs` extra is
    installed (an unknown GEM name is found when the run is built: environments.make)."""
    from trustrl.data import environments
    env = cfg.get("env")
    if env is None or not env.get("id", ""):
        return
    _typed(cfg, ("env.id", "env.template", "env.advantage"), str)
    source = env.id.split(":", 1)[0] if ":" in env.id else ""
    valid_sources = ("trustrl", environments.REASONING_GYM) + environments.GEM_PREFIXES
    if source not in valid_sources:
        raise ValueError(f"env.id={env.id!r} is not valid: give '<source>:<name>' with source "
                         f"one of {list(valid_sources)} (e.g. trustrl:guess_sum, "
                         f"game:Sudoku-v0-easy, rg:arc_1d)")
    name = env.id.split(":", 1)[1]
    if source == "trustrl" and name not in environments.NATIVE:
        raise ValueError(f"env.id={env.id!r}: unknown trustrl environment {name!r}; valid: "
                         f"{['trustrl:' + n for n in environments.NATIVE]}")
    if source != "trustrl":  # GEM / reasoning-gym: the optional `envs` extra must be there
        from trustrl.data import gem_env
        try:
            gem_env.check_installed(env.id)
        except gem_env.MissingExtraError as e:
            raise ValueError(f"env.id={env.id!r}: {e}") from None
    _choice("env.template", env.template, environments.TEMPLATES)
    _choice("env.advantage", env.advantage, advantages.LEVELS)
    for name in ("env.max_turns", "env.max_turn_tokens", "env.max_total_tokens"):
        _int(cfg, name, 1)
    if env.max_turn_tokens > env.max_total_tokens:
        raise ValueError(f"env.max_turn_tokens={env.max_turn_tokens} exceeds "
                         f"env.max_total_tokens={env.max_total_tokens}")
    if cfg.rollout.dynamic_sampling:
        raise ValueError("rollout.dynamic_sampling is not supported with env.id (environment "
                         "episodes); set rollout.dynamic_sampling=False")
    if cfg.model.get("routing_replay", False):
        raise ValueError("model.routing_replay (R3) is not supported with env.id yet: the "
                         "multi-turn sampler does not record routed experts")


def check_environment(cfg, workdir: str, devices=None):
    """Checks what cfg points at on this host: the mesh against the devices (jax.devices() by
    default), model.hf_dir, tokenizer.path, the task files, and the workdir. Writes nothing."""
    import jax

    from trustrl.data import datasets as data
    from trustrl.infra import sharding
    devices = jax.devices() if devices is None else devices
    from trustrl.training import async_rollouts
    try:
        mesh, sampler_meshes = async_rollouts.meshes(cfg, devices)
    except ValueError as e:
        raise ValueError(f"mesh does not fit the {len(devices)} available devices: {e}") from None
    check_mesh_rows(cfg, dict(mesh.shape))
    if sampler_meshes is not None:  # every replica has the same layout
        check_mesh_rows(cfg, dict(sampler_meshes[0].shape))
    if cfg.model.hf_dir:
        d = cfg.model.hf_dir
        if not os.path.isdir(d):
            raise ValueError(f"model.hf_dir={d!r} is not a directory (build one with "
                             f"`python -m trustrl.tools.get_smollm2 DIR`, or set model.hf_dir='' "
                             f"to train a model from scratch)")
        missing = [f for f in ("config.json",) if not os.path.isfile(os.path.join(d, f))]
        if not any(os.path.isfile(os.path.join(d, f))
                   for f in ("model.safetensors", "model.safetensors.index.json")):
            missing.append("model.safetensors (or model.safetensors.index.json)")
        if missing:
            raise ValueError(f"model.hf_dir={d!r} is not a Hugging Face model directory: "
                             f"missing {', '.join(missing)}")
        _check_hf_config(cfg, os.path.join(d, "config.json"), dict(mesh.shape))
    tok = cfg.tokenizer.path or cfg.model.hf_dir
    if tok and not os.path.isfile(os.path.join(tok, "tokenizer.json")):
        field = "tokenizer.path" if cfg.tokenizer.path else "model.hf_dir"
        raise ValueError(f"{field}={tok!r} has no tokenizer.json (trustrl loads fast-tokenizer "
                         f"directories)")
    if cfg.tokenizer.path and not cfg.model.hf_dir:  # the model is built at this vocabulary
        path = os.path.join(tok, "tokenizer.json")
        try:
            import tokenizers
            vocab = tokenizers.Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)
        except Exception as e:  # noqa: BLE001 - the tokenizers library's errors are untyped
            raise ValueError(f"tokenizer.path: cannot load {path}: {type(e).__name__}: "
                             f"{str(e)[:200]}") from None
        check_vocab(cfg, vocab, f"the vocabulary of {path}")
    rm_dir = cfg.get("reward_model", {}).get("hf_dir", "")
    if rm_dir:  # its config.json is read first thing when the run is built (experiment.build)
        missing = [f for f in ("config.json",) if not os.path.isfile(os.path.join(rm_dir, f))]
        if not os.path.isdir(rm_dir) or missing:
            raise ValueError(f"reward_model.hf_dir={rm_dir!r} is not a Hugging Face model "
                             f"directory: " + (f"missing {missing[0]}" if os.path.isdir(rm_dir)
                                               else "no such directory"))
        rm_tok = cfg.reward_model.get("tokenizer", "") or rm_dir
        if not os.path.isfile(os.path.join(rm_tok, "tokenizer.json")):
            field = "reward_model.tokenizer" if cfg.reward_model.get("tokenizer") else (
                "reward_model.hf_dir")
            raise ValueError(f"{field}={rm_tok!r} has no tokenizer.json: the responses are "
                             f"re-rendered with the reward model's own tokenizer")
    t = cfg.task
    if t.name in data.MATH_DATASETS + data.PROMPT_FORMATS:
        find = (data.find_math_files if t.name in data.MATH_DATASETS
                else data.find_preference_files)
        try:
            files = find(t.name, t.manual_dir)
        except (OSError, ValueError) as e:
            raise ValueError(f"task.manual_dir={t.manual_dir!r}: {e}") from None
        if "train" not in files:
            raise ValueError(f"task.name={t.name!r}: the files in task.manual_dir="
                             f"{t.manual_dir!r} hold only a test split (an evaluation set); "
                             f"train on another dataset")
        if "test" not in files and t.num_test < 1:
            raise ValueError(f"task.num_test must be >= 1: the files in task.manual_dir="
                             f"{t.manual_dir!r} have no test split, so task.num_test problems "
                             f"are held out of train for eval")
    _check_workdir(workdir)


def _check_hf_config(cfg, path: str, mesh_shape: dict | None = None):
    """The checks of check_built that a Hugging Face config.json answers before any load
    (``mesh_shape``: the device mesh's {axis: size}, for a mixture of experts' expert split)."""
    try:
        with open(path, encoding="utf-8") as f:
            hf_cfg = json.load(f)
        heads = int(hf_cfg["num_attention_heads"])
        kv = int(hf_cfg.get("num_key_value_heads") or heads)
        head_dim = int(hf_cfg.get("head_dim") or int(hf_cfg["hidden_size"]) // heads)
        vocab = int(hf_cfg["vocab_size"])
        experts = int(hf_cfg.get("num_experts") or 0)  # Qwen3MoeConfig's keys
        if experts:
            k = int(hf_cfg["num_experts_per_tok"])
            layers = int(hf_cfg["num_hidden_layers"])
            dense_layers = [int(i) for i in hf_cfg.get("mlp_only_layers") or ()]
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
        raise ValueError(f"model.hf_dir: cannot read {path}: {type(e).__name__}: {e}") from None
    check_model_shape(heads, kv, head_dim, f"{path}: ")
    check_vocab(cfg, vocab, f"vocab_size of {path}")
    if not experts:
        check_dense_model(cfg, f"model.hf_dir's model is dense ({path} has no num_experts)")
        return
    check_moe_shape(experts, k, layers, dense_layers, f"{path}: ")
    if mesh_shape is not None:
        check_expert_split(experts, mesh_shape, f"{path}: ")


def _check_workdir(workdir: str):
    if not workdir:
        raise ValueError("--workdir is empty")
    from trustrl.infra import storage
    if storage.is_remote(workdir):  # gs://..., checked by a probe upload when the run starts
        storage.check_supported(workdir)
        if storage.isfile(workdir):
            raise ValueError(f"--workdir={workdir!r} exists and is an object, not a directory")
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir={workdir!r} exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(workdir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--workdir={workdir!r} cannot be created: {parent!r} is not a directory")
    target = workdir if os.path.isdir(workdir) else parent
    if not os.access(target, os.W_OK | os.X_OK):
        raise ValueError(f"--workdir={workdir!r}: {target!r} is not writable")
