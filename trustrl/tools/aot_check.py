r"""Does a config fit its TPU slice? Compiles the run's programs for a named TPU topology from any
CPU machine (jax ahead-of-time compilation with libtpu; no TPU needed) and prints per-chip memory
against the chip's HBM.

    python -m trustrl.tools.aot_check --config=configs/qwen3_tpu.py --topology=v5p:2x4x4
    python -m trustrl.tools.aot_check --config=configs/default.py:tiny --topology=cpu:8

Compiled (on abstract arrays, jax.ShapeDtypeStruct with the run's shardings; nothing is
allocated), each the program trustrl.main runs (built by the same trustrl.training.experiment
functions), traced under the target's mesh so "auto" kernels resolve as on the pod (splash on
TPU, inside a shard_map):
  init     the fresh train state (params, Adam moments, counters) with its shardings
  merge    (LoRA runs) the rollout parameters of one iteration: the adapters merged into the
           frozen base and cast (experiment.merge_program), once per iteration
  rollout  one iteration's sampling: prompts_per_iter x group_size rows of --prompt_len (its
           bucket) + rollout.max_new_tokens, rollout.max_rows at a time (continuous slots or
           split calls), with the KV cache the sampler keeps
  reward   (runs with a reward model: --reward_model, or cfg.reward_model.hf_dir) the reward
           model's scoring pass (trustrl.model.reward_model.score_program, bf16 unless
           reward_model.dtype says otherwise): one call of reward_model.batch_size rows (all of
           prompts_per_iter x group_size when 0 or absent; rounded up to a multiple of the
           mesh's data x fsdp, as trustrl.training.rlhf packs them) at reward_model.max_length
           tokens (rounded up to reward_model.bucket; prompt bucket + rollout.max_new_tokens
           without a max_length), on the run's mesh. Its params stay on the chips for the whole
           run, so they are "held" in every other phase; the table's last lines say whether the
           largest policy phase fits with them and what the scoring pass peaks at
  score    the score pass (pi_old of the whole iteration) in train.score_microbatches parts
  train    one optimizer step of a minibatch ((prompts_per_iter x group_size / minibatches)
           rows) in train.microbatches micro-batches
  eval     evaluation's greedy pass (eval.num_prompts rows) and, as eval_k, its eval.k samples
           per prompt (the rollout sampler)
Environment runs (cfg.env.id set; trustrl.training.episodes): rollout, eval and eval_k are the
multi-turn sampler's three programs instead (trustrl.rollout.multiturn.MultiTurnSampler.lower),
one row each, named phase:program:
  prefill  the first prompts into a new row-indexed KV cache of prompt + env.max_total_tokens
           columns (min(episodes, rollout.max_rows) rows)
  loop     the decode loop (one token per generating row per step) on the donated loop state
  append   one observation chunk of obs_bucket(--obs_len) columns (default 256: a game board
           and its feedback; with rollout.max_rows < episodes a refilled row's prompt comes in
           the same chunk, so then at least --prompt_len) appended onto every row's cache
and the score pass / train step get rows of prompt + env.max_total_tokens tokens (one sequence
per episode). No environment is made (nothing of GEM / reasoning-gym is imported to compile):
the end-of-turn id is a placeholder (0), a constant of the loop's stop test whose value does not
change the program.
Per chip: the program (arguments + outputs + temporaries - aliased (donated) bytes, from
XLA's compiled.memory_analysis()) plus what the run keeps alive beside it ("held": the train
state during sampling; the optimizer state, the rollout params, the iteration's batch and, with
rollout.keep_kv_cache, the rollout sampler's KV cache during the score pass and the train
step), computed from the abstract arrays of the same objects; the largest sum is the
iteration's peak. A LoRA run (model.lora.rank > 0): the train state holds only the adapters and
their moments; the frozen base (model.lora.base_quant: int8 / fp8 kernels) is an argument of
the merge, score and train programs and held beside the others. A mixture of experts whose
rollout records its experts also compiles the per-iteration routing metrics (phase "routing",
``training.loop.routing_program``, after the score pass). Exits 1, naming the phases,
when one does not fit (--hbm_gib, default the TPU compiler's own limit for the chip,
HBM_GIB); 2 on bad flags.

The model: model.hf_dir/config.json when it exists, else --model (a preset of MODELS), else the
preset named by hf_dir's last component (e.g. /mnt/models/Qwen3-8B-Base -> qwen3-8b). The
reward model likewise: reward_model.hf_dir/config.json, else --reward_model (REWARD_MODELS),
else the preset hf_dir's last component names (.../Skywork-Reward-Llama-3.1-8B); no reward model
(reward_model.hf_dir empty, no flag, or "reward" not in --phases): no reward phase.
``--topology=cpu:N``: N host CPU devices instead (a fallback where libtpu is not installed;
memory then follows XLA:CPU's layouts, not a TPU's). TPU topologies need the libtpu that
matches the pinned jax: ``pip install "libtpu==0.0.42.*"`` for jax 0.10.2 (jax[tpu]).
Any config field can be overridden as in trustrl.main (``--config.train.microbatches=32``).
A split layout (sampler_mesh.devices > 0, e.g. train.mode="async") compiles each side on its
own chips (trustrl.tools.aot_async): rows "sampler:rollout" and "trainer:PHASE".
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

from absl import app, flags
from ml_collections import config_flags

GiB = 2 ** 30
# The memory per device the TPU compiler allows (GiB), by the topology name's prefix: read from
# its RESOURCE_EXHAUSTED message ("exceeds available HBM (95.74G)") with libtpu 0.0.42.1; less
# than the marketed HBM (v5p 95, v5e 16, v6e 32 GiB; v4's 32 GiB chip is two 16 GiB cores).
HBM_GIB = {"v4": 15.25, "v5e": 15.75, "v5p": 95.74, "v6e": 31.25}
# HF config.json fields of dense models this tool can size without their files
_QWEN3 = dict(architectures=["Qwen3ForCausalLM"], vocab_size=151936, head_dim=128,
              num_key_value_heads=8, rope_theta=1000000.0, rms_norm_eps=1e-6,
              max_position_embeddings=40960)
MODELS = {
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, tie_word_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, tie_word_embeddings=True),
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, tie_word_embeddings=False),
    "qwen3-14b": dict(_QWEN3, hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                      num_attention_heads=40, tie_word_embeddings=False),
    "qwen3-32b": dict(_QWEN3, hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                      num_attention_heads=64, tie_word_embeddings=False),
    # mixtures of experts (Qwen3MoeForCausalLM; trustrl.model.moe): Qwen/Qwen3-30B-A3B's
    # config.json (-Base: the same shape), 30.5B parameters, 3.3B active per token
    "qwen3-30b-a3b": dict(_QWEN3, architectures=["Qwen3MoeForCausalLM"], hidden_size=2048,
                          intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, tie_word_embeddings=False, num_experts=128,
                          num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[]),
    # its layout scaled down (a quick compile: tests, a first look at a slice)
    "qwen3-moe-small": dict(_QWEN3, architectures=["Qwen3MoeForCausalLM"], hidden_size=512,
                            intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=64, tie_word_embeddings=False,
                            num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
                            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
}
# Reward models (*ForSequenceClassification config.json fields) this tool can size without their
# files. Skywork-Reward-Llama-3.1-8B (the paper's sec. 7.2 reward model) is Llama-3.1-8B with a
# one-label score head; its pad token does not change the program's memory.
_LLAMA31_8B_RM = dict(architectures=["LlamaForSequenceClassification"], model_type="llama",
                      vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, rope_theta=500000.0, rope_scaling=dict(
                          rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192),
                      rms_norm_eps=1e-5, max_position_embeddings=131072,
                      tie_word_embeddings=False, num_labels=1, pad_token_id=None)
REWARD_MODELS = {"llama3.1-8b": _LLAMA31_8B_RM, "skywork-reward-llama-3.1-8b": _LLAMA31_8B_RM}
PHASES = ("init", "merge", "rollout", "reward", "score", "routing", "train", "eval")
# merge: LoRA only; routing: a mixture of experts whose rollout records its experts
OBS_LEN = 256  # environment runs: observation tokens per appended chunk (--obs_len)


def _define_flags():
    """The command line's flags (defined when run as a program: trustrl.main defines --config
    too, and both modules are imported by the tests)."""
    global _CONFIG, _TOPOLOGY, _MODEL, _REWARD_MODEL, _HBM, _PROMPT_LEN, _OBS_LEN, _PHASES, _JSON
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variant].",
                                              lock_config=True)
    _TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:2x4x4, v5e:4x4, "
                                    "v4:2x2x2; or cpu:N (N host CPU devices).")
    _MODEL = flags.DEFINE_string("model", None, f"Model preset when model.hf_dir has no "
                                 f"config.json: one of {sorted(MODELS)}.")
    _REWARD_MODEL = flags.DEFINE_string(
        "reward_model", None, f"Reward model preset when reward_model.hf_dir has no "
        f"config.json (or is not set): one of {sorted(REWARD_MODELS)}.")
    _HBM = flags.DEFINE_float("hbm_gib", None, "Memory per chip to check against (default: the "
                              "chip's HBM; none for cpu:N).")
    _PROMPT_LEN = flags.DEFINE_integer("prompt_len", 512, "Prompt tokens per row (the bucket).")
    _OBS_LEN = flags.DEFINE_integer("obs_len", OBS_LEN, "Environment runs (env.id): tokens of "
                                    "the observation chunk appended per host exit (its bucket).")
    _PHASES = flags.DEFINE_list("phases", list(PHASES), f"Which of {list(PHASES)} to compile.")
    _JSON = flags.DEFINE_string("json", None, "Also write the rows, the settings assumed and the "
                                "versions to this JSON file (benchmarks/pod_memory.py reads it).")


def _fail(msg: str):
    print(f"aot_check: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_topology(name: str) -> tuple[str, int | None, float | None]:
    """('tpu' | 'cpu', CPU device count, HBM GiB per chip) of a --topology value."""
    m = re.fullmatch(r"cpu:(\d+)", name)
    if m:
        if int(m.group(1)) < 1:
            raise ValueError(f"--topology={name}: need at least one CPU device")
        return "cpu", int(m.group(1)), None
    m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(x\d+){1,2})", name)
    if not m:
        raise ValueError(f"--topology={name!r} is not valid: use a TPU generation and chip grid "
                         f"({', '.join(f'{g}:AxB[xC]' for g in HBM_GIB)}, e.g. v5p:2x4x4) or "
                         f"cpu:N")
    return "tpu", None, float(HBM_GIB[m.group(1)])


def model_hf_config(cfg, preset: str | None) -> tuple[dict, str]:
    """(HF config dict, where it came from)."""
    hf_dir = cfg.model.hf_dir
    if preset is None and hf_dir and os.path.isfile(os.path.join(hf_dir, "config.json")):
        with open(os.path.join(hf_dir, "config.json")) as f:
            return json.load(f), os.path.join(hf_dir, "config.json")
    name = preset
    if name is None and hf_dir:
        base = os.path.basename(os.path.normpath(hf_dir)).lower()
        name = next((k for k in sorted(MODELS, key=len, reverse=True)
                     if base == k or base.startswith(k + "-")), None)
    if name is None and not hf_dir:  # the config's own model fields (a trustrl-trained BPE)
        m = cfg.model
        hf = dict(architectures=["LlamaForCausalLM"], vocab_size=cfg.tokenizer.vocab_size,
                  hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                  num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                  num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim,
                  rope_theta=m.rope_theta, tie_word_embeddings=m.tie_word_embeddings)
        if m.get("num_experts", 0) > 0:  # the qwen3_moe model experiment.model_config builds
            hf.update(architectures=["Qwen3MoeForCausalLM"], num_experts=m.num_experts,
                      num_experts_per_tok=m.num_experts_per_tok,
                      moe_intermediate_size=m.moe_intermediate_size,
                      norm_topk_prob=m.norm_topk_prob, decoder_sparse_step=m.decoder_sparse_step,
                      mlp_only_layers=list(m.mlp_only_layers))
        return hf, "config"
    if name is None:
        raise ValueError(f"no model shape: model.hf_dir={hf_dir!r} has no config.json and names "
                         f"no preset; pass --model, one of {sorted(MODELS)}")
    if name not in MODELS:
        raise ValueError(f"--model={name!r} is not a preset; choose one of {sorted(MODELS)}")
    return MODELS[name], f"preset {name}"


def reward_hf_config(cfg, preset: str | None) -> tuple[dict | None, str | None]:
    """(HF config dict of the run's reward model, where it came from), (None, None) without
    one: reward_model.hf_dir/config.json, else the preset ``preset`` names, else the one
    hf_dir's last component names."""
    rm = cfg.get("reward_model") or {}
    hf_dir = rm.get("hf_dir", "") or ""
    file = os.path.join(hf_dir, "config.json") if hf_dir else ""
    if preset is None and file and os.path.isfile(file):
        with open(file) as f:
            return json.load(f), file
    name = preset
    if name is None and hf_dir:
        base = os.path.basename(os.path.normpath(hf_dir)).lower()
        name = next((k for k in sorted(REWARD_MODELS, key=len, reverse=True)
                     if base == k or base.startswith(k + "-")), None)
        if name is None:
            raise ValueError(f"no reward model shape: reward_model.hf_dir={hf_dir!r} has no "
                             f"config.json and names no preset; pass --reward_model, one of "
                             f"{sorted(REWARD_MODELS)} (or leave 'reward' out of --phases)")
    if name is None:
        return None, None
    if name not in REWARD_MODELS:
        raise ValueError(f"--reward_model={name!r} is not a preset; choose one of "
                         f"{sorted(REWARD_MODELS)}")
    return REWARD_MODELS[name], f"preset {name}"


def reward_spec(cfg, hf_config: dict, mesh, default_width: int) -> dict:
    """What the reward phase compiles: the reward model's config (reward_model.dtype, default
    bf16), its abstract sharded params, and one scoring call's abstract (tokens, positions,
    valid): ``rows`` rows (reward_model.batch_size, or all of prompts_per_iter x group_size,
    rounded up to a multiple of the mesh's data x fsdp) of ``width`` tokens
    (reward_model.max_length, else ``default_width``, rounded up to reward_model.bucket);
    ``calls``: scoring calls per iteration."""
    import math

    import jax
    import jax.numpy as jnp

    from trustrl.infra import sharding
    from trustrl.model import reward_model

    rm = cfg.get("reward_model") or {}
    dtype = rm.get("dtype", "") or "bfloat16"
    config = reward_model.config_from_hf(hf_config, param_dtype=dtype, dtype=dtype)
    total = cfg.rollout.prompts_per_iter * cfg.rollout.group_size
    per_call = min(int(rm.get("batch_size", 0) or 0) or total, total)
    shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    rows = shards * math.ceil(per_call / shards)
    width = int(rm.get("max_length", 0) or 0) or default_width
    bucket = int(rm.get("bucket", 0) or 0)
    width = bucket * math.ceil(width / bucket) if bucket else width
    batch = tuple(jax.ShapeDtypeStruct((rows, width), dt,
                                       sharding=sharding.batch_sharding(mesh))
                  for dt in (jnp.int32, jnp.int32, jnp.bool_))
    return dict(config=config, params=reward_model.abstract_params(config, mesh), batch=batch,
                rows=rows, width=width, calls=math.ceil(total / per_call), dtype=dtype,
                program=reward_model.score_program(config, mesh))


def compiled_memory(compiled) -> dict:
    """GiB per device of a compiled program (XLA's memory analysis): args, out, temp and total
    = args + out + temp - aliased (donated) bytes."""
    m = compiled.memory_analysis()
    total = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
             - m.alias_size_in_bytes)
    return dict(args=m.argument_size_in_bytes / GiB, out=m.output_size_in_bytes / GiB,
                temp=m.temp_size_in_bytes / GiB, total=total / GiB)


def per_chip_gib(tree) -> float:
    """GiB one device holds of a pytree of sharded jax.ShapeDtypeStructs (or arrays): each leaf's
    shard shape (its sharding's ``shard_shape``) times its item size; replicated leaves whole."""
    import jax
    import numpy as np
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total / GiB


def _sampler_held(cfg, params_gib: float) -> dict:
    """What a split layout's sampler holds beside the rollout parameters it samples with: the
    next version (a weight sync arriving); with train.rollout_version="scheduled" the newer
    versions a later rollout will be given: ceil(max_staleness / sync_every) copies (>= 1)."""
    t = cfg.train
    copies = 1
    if t.mode == "async" and t.get("rollout_version", "newest") == "scheduled":
        copies = max(1, -(-int(t.max_staleness) // int(t.sync_every)))
    what = ("next rollout params (a weight sync arriving)" if copies == 1 else
            f"{copies} newer rollout param versions (scheduled)")
    return {what: copies * params_gib}


def check(cfg, devices, *, hf_config: dict, prompt_len: int, phases=PHASES, log=print,
          obs_len: int = OBS_LEN, reward_config: dict | None = None,
          side: str | None = None) -> list:
    """Compiles the phases for cfg.mesh over ``devices``; returns one row dict per phase (per
    program of an environment run's multi-turn phases), each with the program's memory and
    ``held``: what the run keeps alive on the chip during it ({name: GiB per chip}, from the
    same objects the run holds), so ``total + held`` is the phase's peak. ``obs_len``: an
    environment run's observation chunk (module docstring). ``reward_config``: the reward
    model's HF config (``reward_hf_config``), None without one; with it the "reward" phase
    is compiled and its params are held in every other phase (the row of the reward phase
    carries them as ``reward_model_params``). ``side``: one side of a split layout
    (trustrl.tools.aot_async): "sampler" (only the rollout; it holds the rollout params and,
    while a sync arrives, the next version's, not the train state) or "trainer" (everything
    else; the sampler's KV cache is not on its chips)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from trustrl.model import attention, hf, lora, policy
    from trustrl.training import experiment
    from trustrl.core import losses
    from trustrl.infra import sharding
    from trustrl.training import config_validation as cv
    from trustrl.model import transformer as model_lib
    from trustrl.training import step as ts
    from trustrl.rollout.sampler import prompt_bucket
    from trustrl.training import episodes

    mesh = sharding.make_mesh(cfg.mesh, devices=devices)
    model_cfg = hf.config_from_hf(hf_config, param_dtype=cfg.model.param_dtype,
                                  dtype=cfg.model.dtype, remat=cfg.model.remat)
    model_cfg = experiment.with_run_fields(cfg, model_cfg)
    model_cfg = experiment.with_lora(cfg, model_cfg)  # unchanged without LoRA
    roll_cfg = policy.rollout_config(lora.merged_config(model_cfg), cfg.rollout.dtype,
                                     cfg.rollout.head_dtype)
    tx = experiment.optimizer(cfg)
    state_sh = ts.state_shardings(model_cfg, tx, mesh)
    sampler, eval_greedy = experiment.samplers(cfg, _EosOnly(), roll_cfg, mesh)
    multi = None  # an environment run's multi-turn samplers (as episodes.build makes them)
    if episodes.enabled(cfg):
        from trustrl.rollout import multiturn
        mt = episodes.multiturn_config(cfg)
        decode = policy.decode_model(roll_cfg)
        plain = lambda c: dataclasses.replace(c, max_new_tokens=mt.max_total_tokens)
        sh = sharding.batch_sharding(mesh)
        multi = (multiturn.MultiTurnSampler(decode, plain(sampler.cfg), mt, batch_sharding=sh),
                 multiturn.MultiTurnSampler(decode, plain(eval_greedy.cfg), mt,
                                            batch_sharding=sh))
        # the trainer's rows: prompt + the episode's max_total_tokens (batch_spec reads them
        # from rollout.max_new_tokens)
        cfg = cfg.copy_and_resolve_references()
        cfg.rollout.max_new_tokens = mt.max_total_tokens

    def abstract(shapes, shardings):
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, shardings)

    # the policy's parameters; a LoRA run splits them into the frozen base and the adapters
    # (the train state's params: state_sh.params)
    frozen = None
    if model_cfg.lora_rank:
        full = abstract(model_lib.param_shapes(model_cfg),
                        model_lib.param_shardings(model_cfg, mesh))
        frozen, params = lora.split(full)
    else:
        params = abstract(model_lib.param_shapes(model_cfg), state_sh.params)
    roll_params = abstract(model_lib.param_shapes(roll_cfg),
                           model_lib.param_shardings(roll_cfg, mesh))
    state = ts.abstract_state(params, tx, state_sh)
    rows, n_new = cfg.rollout.prompts_per_iter * cfg.rollout.group_size, cfg.rollout.max_new_tokens
    width = prompt_bucket(prompt_len, sampler.cfg)
    method = cfg.loss.method
    need_old = losses.METHODS[method].needs_old_logp
    topk = sampler.cfg.record_topk
    scored = cfg.train.score_pass or need_old  # old_logp of the whole iteration is then kept
    iteration = experiment.batch_spec(cfg, sampler.cfg, rows, width, mesh, old_logp=scored,
                                      model_cfg=model_cfg)
    mb_rows = rows // cfg.train.minibatches
    minibatch = experiment.batch_spec(cfg, sampler.cfg, mb_rows, width, mesh, old_logp=need_old,
                                      model_cfg=model_cfg)
    replayed = "routed_experts" in iteration  # R3: the batch carries the recorded experts
    with jax.set_mesh(mesh):  # what the run traces under: "auto" kernels resolve for it
        kernel = attention.resolve(model_cfg.attention, width + n_new, model_cfg.compute_dtype)
    at_once = lambda n: min(n, sampler.cfg.max_rows) if sampler.cfg.max_rows else n
    slots = at_once(rows)
    # an environment run's appended chunk: an observation (one longer than max_total_tokens
    # ends its episode), or with refilled rows (max_rows < episodes) also a prompt
    chunk = lambda n: (min(obs_len, n_new) if at_once(n) == n
                       else max(min(obs_len, n_new), prompt_len))
    log(f"  assumed: prompt bucket {width} (--prompt_len={prompt_len}), {rows} "
        + (f"episodes (env.id {cfg.env.id!r}: multi-turn, {mt.max_turns} turns of <= "
           f"{mt.max_turn_tokens} tokens, {slots} rows at a time, observation chunks of "
           f"{multiturn.obs_bucket(chunk(rows), mt)} tokens (--obs_len={obs_len})) "
           if multi else "rows ")
        + f"of {width} + {n_new} tokens per iteration, attention {model_cfg.attention!r} -> "
        f"{kernel!r} on {devices[0].platform}, rollout {cfg.rollout.dtype}, mu's top-K "
        f"recorded: {topk or 'no'}, "
        + (f"routed experts recorded ({'replayed' if replayed else 'not replayed'}), "
           if sampler.cfg.record_routes else "")
        + "score pass: "
        + (f"{cv.score_microbatches(cfg)} part(s)" if scored else "off")
        + (f", eval: {cfg.eval.num_prompts} greedy + {cfg.eval.num_prompts} x {cfg.eval.k} "
           f"sampled rows" if cfg.eval.every else ", eval: off")
        + (f", LoRA r {model_cfg.lora_rank} alpha {model_cfg.lora_alpha:g} on "
           f"{len(model_cfg.lora_targets)} projection(s) ({lora.num_params(params) / 1e6:.1f}M "
           f"adapter parameters), frozen base "
           f"{model_cfg.weight_quant or jnp.dtype(model_cfg.param_dtype).name}"
           if frozen is not None else ""))

    # what the run keeps on the chip between its programs (trustrl.training.loop._loop)
    rollout_cache = sampler.abstract_cache(slots, width)
    held_state = {} if side == "sampler" else {"train state": per_chip_gib(state)}
    held_frozen = {} if frozen is None else {"frozen base": per_chip_gib(frozen)}
    held_state.update(held_frozen)  # (the base stays on the chips for the whole run)
    # (the multi-turn sampler keeps no cache between its calls)
    held_cache = ({"rollout sampler's KV cache": per_chip_gib(rollout_cache)}
                  if cfg.rollout.get("keep_kv_cache", False) and multi is None
                  and side != "trainer" else {})
    held_roll = {"rollout params": per_chip_gib(roll_params)}
    prompts = {k: jax.ShapeDtypeStruct(shape, jnp.int32,
                                       sharding=sharding.batch_sharding(mesh, len(shape)))
               for k, shape in (("prompt_tokens", (rows, width)), ("prompt_mask", (rows, width)),
                                ("finish_reason", (rows,)), ("group_index", (rows,)))}
    # (the Rollout's own arrays)
    held_batch = {"iteration's batch": per_chip_gib(iteration),
                  "rollout record's prompts": per_chip_gib(prompts)}
    held_routes, routes = {}, None
    if sampler.cfg.record_routes:  # the rollout's recorded experts
        from trustrl.rollout.record import routes_dtype
        routes = jax.ShapeDtypeStruct(
            (rows, width + n_new, len(model_cfg.sparse_layers), model_cfg.num_experts_per_tok),
            routes_dtype(model_cfg.num_experts), sharding=sharding.batch_sharding(mesh, 4))
    if routes is not None and not replayed:  # kept by the Rollout for the routing metrics
        held_routes = {"rollout record's routed experts": per_chip_gib(routes)}
        held_batch.update(held_routes)
    rm = None  # the reward model: held through the whole run, scored after each rollout
    held_rm = {}
    if reward_config is not None and "reward" in phases:
        rm = reward_spec(cfg, reward_config, mesh, width + n_new)
        held_rm = {"reward model params": per_chip_gib(rm["params"])}
        log(f"  assumed: reward model {rm['config'].architecture} ({rm['dtype']}, "
            f"{rm['config'].model.num_layers} layers, width {rm['config'].model.hidden_size}): "
            f"{rm['calls']} scoring call(s) per iteration of {rm['rows']} rows x {rm['width']} "
            f"tokens")
    out = []

    def record(phase, shape, lower, held):
        if phase != "reward":  # (the reward phase has them as its arguments)
            held = {**held, **held_rm}
        t0 = time.perf_counter()
        try:
            memory = compiled_memory(lower().compile())
        except Exception as e:  # noqa: BLE001 - the TPU compiler refuses programs over its HBM
            m = re.search(r"RESOURCE_EXHAUSTED: .*?HLO temporaries \(([\d.]+)([GMK])\)", str(e))
            if m is None:
                raise
            temp = float(m.group(1)) / {"G": 1, "M": 2 ** 10, "K": 2 ** 20}[m.group(2)]
            memory = dict(args=float("nan"), out=float("nan"), temp=temp, total=float("inf"),
                          refused=str(e).split("RESOURCE_EXHAUSTED: ", 1)[1].splitlines()[0])
        row = dict(phase=phase, shape=shape, compile_s=time.perf_counter() - t0, held=held,
                   **memory)
        row["peak"] = row["total"] + sum(held.values())
        log(f"  {phase}: {shape}: " + (f"{row['total']:.2f} GiB per chip + {sum(held.values()):.2f}"
                                       f" held = {row['peak']:.2f}" if "refused" not in row else
                                       f"refused by the compiler: {row['refused']}")
            + f" ({row['compile_s']:.1f} s)")
        out.append(row)

    if "init" in phases:
        init = ts.init_program(tx, state_sh)
        record("init", "train state" + (" (adapters)" if frozen is not None else ""),
               lambda: init.lower(params), held_frozen)
    if "merge" in phases and frozen is not None:  # the train state's moments stay beside it
        merge = experiment.merge_program(model_cfg, roll_cfg)
        record("merge", f"LoRA merged into {len(model_cfg.lora_targets)} projection(s), "
               f"cast ({cfg.rollout.dtype})",
               lambda: merge.lower(params, frozen),
               {"optimizer state": per_chip_gib(state.opt_state)})
    # the score pass and the train step take the frozen base as an argument
    policy_params = ts.policy_params(params, frozen)
    frozen_args = () if frozen is None else (frozen,)

    def record_multi(phase, mts, n_rows, label=""):
        """An environment run's phase: the multi-turn sampler's programs, one row each."""
        for name, what, lowered in mts.lower(roll_params, n_rows, width, chunk(n_rows),
                                             sharding.batch_sharding(mesh)):
            record(f"{phase}:{name}", label + what, lambda: lowered, held_state)

    with jax.set_mesh(mesh):
        if "rollout" in phases and multi:  # the train state stays on the chips while it samples
            record_multi("rollout", multi[0], rows)
        elif "rollout" in phases:
            what, lowered, _ = sampler.lower(roll_params, rows, width)
            record("rollout", what, lambda: lowered, held_state if side != "sampler" else
                   _sampler_held(cfg, per_chip_gib(roll_params)))
        if rm is not None:  # after the rollout: the policy's state, rollout params and record
            record("reward", f"{rm['rows']} x {rm['width']} tokens per call, {rm['calls']} "
                   f"call(s) ({rm['dtype']})",
                   lambda: rm["program"].lower(rm["params"], *rm["batch"]),
                   {**held_state, **held_roll, **held_cache, **{
                       ("rollout record (~ the iteration's batch)" if k == "iteration's batch"
                        else k): v for k, v in held_batch.items()}})
            out[-1]["reward_model_params"] = held_rm["reward model params"]
        # the score pass and the routing metrics: forward passes of the whole iteration
        in_parts = (f"{rows} x ({width} + {n_new}) tokens in {cv.score_microbatches(cfg)} "
                    f"part(s)")
        held_scoring = {"optimizer state": per_chip_gib(state.opt_state), **held_roll,
                        **held_cache}
        if "score" in phases and scored:
            score = experiment.score_program(cfg, model_cfg, mesh)
            record("score", in_parts, lambda: score.lower(policy_params, iteration),
                   {**held_scoring, **held_routes})
        if "routing" in phases and routes is not None:  # loop: after the score pass
            from trustrl.training import loop as loop_lib
            routing = loop_lib.routing_program(cfg, model_cfg, mesh)
            recorded = {**iteration, "routed_experts": routes}  # its argument, not held
            record("routing", in_parts,
                   lambda: routing.lower(policy_params, recorded, iteration.get("old_logp")),
                   held_scoring)
        if "train" in phases:  # the donated state is an argument; the iteration's batch is kept
            step = experiment.train_step_program(cfg, model_cfg, roll_cfg, tx, state_sh, mesh)
            record("train", f"{mb_rows} x ({width} + {n_new}) tokens, "
                   f"{cfg.train.microbatches} micro-batch(es)",
                   lambda: step.lower(state, minibatch, roll_params, *frozen_args),
                   {**held_cache, **held_batch})
        if "eval" in phases and cfg.eval.every and multi:  # greedy episodes, then sampled
            record_multi("eval", multi[1], cfg.eval.num_prompts, "greedy: ")
            if cfg.eval.k > 1:
                record_multi("eval_k", multi[0], cfg.eval.num_prompts * cfg.eval.k,
                             f"pass@{cfg.eval.k}: ")
        elif "eval" in phases and cfg.eval.every:  # greedy (rollout sampler's cache freed first)
            n_eval = cfg.eval.num_prompts
            what, lowered, _ = eval_greedy.lower(roll_params, n_eval, width)
            record("eval", "greedy: " + what, lambda: lowered, held_state)
            if cfg.eval.k > 1:
                what, lowered, _ = sampler.lower(roll_params, n_eval * cfg.eval.k, width)
                record("eval_k", f"pass@{cfg.eval.k}: " + what, lambda: lowered, held_state)
    return out


class _EosOnly:
    eos_id = 0  # the sampler config needs a stop token id; its value does not change memory


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}")
    cfg = _CONFIG.value
    if cfg is None or not _TOPOLOGY.value:
        _fail("--config and --topology are required (see --help)")
    bad = [p for p in _PHASES.value if p not in PHASES]
    if bad:
        _fail(f"--phases: unknown {bad}; valid: {list(PHASES)}")
    if _OBS_LEN.value < 1:
        _fail(f"--obs_len must be >= 1 (observation tokens per appended chunk), got "
              f"{_OBS_LEN.value}")
    try:
        kind, n_cpu, hbm = parse_topology(_TOPOLOGY.value)
        hf_config, source = model_hf_config(cfg, _MODEL.value)
        reward_config, reward_source = (reward_hf_config(cfg, _REWARD_MODEL.value)
                                        if "reward" in _PHASES.value else (None, None))
    except ValueError as e:
        _fail(str(e))
    hbm = _HBM.value if _HBM.value is not None else hbm
    if kind == "cpu":
        os.environ["XLA_FLAGS"] = (re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                                          os.environ.get("XLA_FLAGS", ""))
                                   + f" --xla_force_host_platform_device_count={n_cpu}")
        os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # compile-only: no TPU workers
    # compile-only devices touch no chip: several checks (and tests) may run at once without
    # libtpu's one-process-per-host lock file
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax
    from trustrl.training import config_validation as cv
    try:
        cv.validate(cfg)
    except ValueError as e:
        _fail(f"invalid config: {e}")
    t0 = time.perf_counter()
    if kind == "cpu":
        devices = jax.devices("cpu")
        if len(devices) != n_cpu:
            _fail(f"--topology=cpu:{n_cpu} but jax already has {len(devices)} CPU devices")
    else:
        try:
            from jax.experimental import topologies
            devices = topologies.get_topology_desc(_TOPOLOGY.value, "tpu").devices
        except Exception as e:  # noqa: BLE001 - no libtpu, or an unknown topology
            _fail(f"cannot make TPU topology {_TOPOLOGY.value!r} ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); install the libtpu matching jax "
                  f"{jax.__version__} (pip install 'jax[tpu]=={jax.__version__}') or use "
                  f"--topology=cpu:N")
    print(f"aot_check: {_TOPOLOGY.value} ({len(devices)} chips, {devices[0].device_kind}), mesh "
          f"{dict(cfg.mesh)}, model from {source}"
          + (f", reward model from {reward_source}" if reward_source else "")
          + f", jax {jax.__version__}")
    assumed = []
    log = lambda line: (print(line, flush=True), assumed.append(line.strip()[len("assumed: "):])
                        if line.strip().startswith("assumed: ") else None)
    kw = dict(hf_config=hf_config, prompt_len=_PROMPT_LEN.value, obs_len=_OBS_LEN.value,
              reward_config=reward_config)
    try:
        from trustrl.training import async_rollouts
        if async_rollouts.split(cfg):  # a split layout: each side on its chips (aot_async)
            from trustrl.tools import aot_async
            rows = aot_async.split_check(cfg, devices, check=check, log=log,
                                         phases=_PHASES.value, **kw)
        else:
            rows = check(cfg, devices, phases=_PHASES.value, log=log, **kw)
    except ValueError as e:
        _fail(str(e))
    table, verdict = report(rows, hbm)
    print(table)
    if _JSON.value:
        import importlib.metadata
        versions = {}
        for name in ("jax", "jaxlib", "libtpu"):
            try:
                versions[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                versions[name] = None
        with open(_JSON.value, "w") as f:
            json.dump(dict(topology=_TOPOLOGY.value, chips=len(devices), model=source,
                           reward_model=reward_source,
                           mesh=dict(cfg.mesh), hbm_gib=hbm, assumed=assumed, versions=versions,
                           fits=verdict is None, rows=rows), f, indent=1,
                      default=lambda x: None)
    print(f"(total {time.perf_counter() - t0:.0f} s)")
    if verdict:
        print(verdict, file=sys.stderr)
        sys.exit(1)


def _reward_lines(rows, peaks, hbm: float | None) -> list[str]:
    """The reward model's verdict: its params are held through the run, its scoring pass'
    activations only while it scores."""
    i = next((i for i, r in enumerate(rows) if r["phase"] == "reward"), None)
    if i is None:
        return []
    params, others = rows[i]["reward_model_params"], [j for j in range(len(rows)) if j != i]
    fits = lambda peak: "" if hbm is None else (f" of {hbm:g}: " + (
        "fits" if peak <= hbm else "does NOT fit"))
    out = [f"reward model: {params:.4g} GiB of params per chip, held through the whole run; "
           f"its scoring pass peaks at {peaks[i]:.4g} GiB{fits(peaks[i])}"]
    if others:
        j = max(others, key=lambda j: peaks[j])
        out.append(f"  beside the largest policy phase ({rows[j]['phase']}: "
                   f"{peaks[j] - params:.4g} GiB): {peaks[j]:.4g} GiB per chip with the reward "
                   f"model's params{fits(peaks[j])}")
    return out


def report(rows, hbm: float | None) -> tuple[str, str | None]:
    """(the table, None when every phase's peak fits else the line naming those that do not).
    A phase's peak is its program (arguments + outputs + temporaries - donated) plus what the
    run keeps alive beside it (``held``); the iteration's peak is the largest."""
    lines = [f"\n{'phase':15} | {'program':52} | {'args':>7} | {'temp':>7} | {'total':>7} | "
             f"{'held':>7} | {'peak GiB':>8} | {'limit':>6} | fits | compile s"]
    over = []
    for r in rows:
        held = sum(r.get("held", {}).values())
        peak = r.get("peak", r["total"] + held)
        fits = "NO" if "refused" in r else "-" if hbm is None else (
            "yes" if peak <= hbm else "NO")
        if fits == "NO":
            over.append(r["phase"])
        lines.append(f"{r['phase']:15} | {r['shape'][:52]:52} | {r['args']:7.3g} | "
                     f"{r['temp']:7.4g} | {r['total']:7.4g} | {held:7.3g} | {peak:8.4g} | "
                     f"{'-' if hbm is None else f'{hbm:g}':>6} | {fits:4} | {r['compile_s']:9.1f}")
    peaks = [r.get("peak", r["total"]) for r in rows]
    if rows:
        worst = rows[peaks.index(max(peaks))]
        lines.append(f"whole iteration: peak {max(peaks):.4g} GiB per chip ({worst['phase']})"
                     + ("" if hbm is None else f" of {hbm:g}"))
        for r in rows:
            if r.get("held"):
                lines.append(f"  held during {r['phase']}: " + ", ".join(
                    f"{k} {v:.3g}" for k, v in r["held"].items()))
        lines += _reward_lines(rows, peaks, hbm)
    if not over:
        return "\n".join(lines), None
    limit = f"{hbm:g} GiB per chip" if hbm is not None else "the device memory"
    return "\n".join(lines), (f"aot_check: {', '.join(over)} do(es) not fit in {limit}; more "
                              f"train.microbatches / train.score_microbatches, a smaller "
                              f"rollout.max_rows, more chips on fsdp / tensor, or remat")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
