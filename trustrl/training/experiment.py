"""Builds everything a run needs from its config: mesh, tokenizer, data, model, optimizer,
samplers and the jitted phase functions. ``loop.py`` only composes what ``build`` returns.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from trustrl.training import config_validation as cv, filtering, optim, step as ts, warmstart
from trustrl.training import async_rollouts, episodes as episodes_lib, rlhf
from trustrl.data import datasets as data, preferences, tasks
from trustrl.model import hf, lora, policy, quant, reward_model
from trustrl.model import transformer as model_lib
from trustrl.core import losses
from trustrl.infra import integrity, multihost, sharding, storage
from trustrl.model.transformer import ModelConfig, init_params
from trustrl.rollout import mismatch
from trustrl.rollout.sampler import Sampler, SamplerConfig
from trustrl.data.tokenizer import Tokenizer, train_bpe
from trustrl.data.task_env import TaskEnv


@dataclasses.dataclass
class Run:
    cfg: Any
    mesh: Any
    env: TaskEnv
    model_cfg: ModelConfig
    rollout_cfg: ModelConfig
    state: ts.TrainState
    key: jax.Array
    prompt_iter: data.PromptIterator
    sampler: Sampler
    eval_greedy: Sampler
    rollout_params: Callable
    score: Callable
    train_step: Callable
    # LoRA (model.lora.rank > 0): the frozen base (state.params holds only the adapters) and
    # its identity (lora_base_id), checked when a checkpoint is restored
    frozen: Any = None
    base_id: dict | None = None
    # environment episodes (cfg.env.id; trustrl.training.episodes), None for the task's prompts
    episodes: Any = None
    # RLHF (reward_model.hf_dir; trustrl.training.rlhf): the reward model scoring the responses,
    # and with reward_model.kl_coef > 0 the reference policy (the initial parameters)
    reward: Any = None
    reference: Any = None
    # a split layout (sampler_mesh.devices > 0): this process's sampler replicas, each
    # (replica index, its sub-mesh, its rollout sampler); None without one
    sampler_replicas: tuple | None = None

    def policy_params(self, params=None):
        """The model's parameter tree for ``params`` (default: the state's): with LoRA, the
        adapters joined to the frozen base (no copy)."""
        return ts.policy_params(self.state.params if params is None else params, self.frozen)


def _tokenizer(cfg, workdir: str, train_examples) -> Tokenizer:
    """The run's tokenizer: from a path / the model dir, or a byte-level BPE trained on the task
    text, saved in the workdir (WORKDIR/tokenizer, with an integrity record:
    trustrl.infra.integrity)
    so a resumed run uses the identical vocabulary.

    On resume the saved tokenizer is checked against its record: a changed, missing or added
    file is refused (IntegrityError naming the file), never replaced, since the run's
    checkpoints were trained with the recorded vocabulary. A saved tokenizer without a record (an
    older trustrl's run, or a kill between the save and its record) is compared with the
    tokenizer trained again from the task data (BPE training is deterministic in its input):
    identical, it is recorded and used; different, it is refused. An unrecorded, incomplete one
    (an older trustrl's non-atomic save) is kept aside and trained again. Remote workdirs keep
    it in the workdir and load it through a host-local copy."""
    path = cfg.tokenizer.path or cfg.model.hf_dir
    if path:
        return Tokenizer.from_dir(path)
    saved = storage.join(workdir, "tokenizer")
    recorded = _check_saved_tokenizer(saved)  # None: nothing saved, else whether it has a record
    load = saved
    if storage.is_remote(workdir):  # tokenizers load from local files: a host-local copy
        load = os.path.join(storage.local_dir(workdir), f"tokenizer.p{jax.process_index()}")
        if os.path.exists(load):  # a copy from an earlier start: copied afresh
            shutil.rmtree(load)
        if recorded is not None and storage.isfile(storage.join(saved, "tokenizer.json")):
            storage.copy_tree(saved, load)
    tokenizer = _saved_tokenizer(load, saved, recorded)
    if tokenizer is not None:
        if not recorded:
            _adopt_unrecorded(cfg, train_examples, saved, load)
        if tokenizer.vocab_size != cfg.tokenizer.vocab_size:
            raise ValueError(f"{saved} has {tokenizer.vocab_size} tokens but tokenizer.vocab_size"
                             f"={cfg.tokenizer.vocab_size}: this workdir was started with another "
                             f"vocabulary; use a new workdir (or move {saved} away if the "
                             f"workdir has no checkpoints)")
        return tokenizer
    primary = jax.process_index() == 0
    if load != saved:
        if os.path.exists(load):
            shutil.rmtree(load)
        tokenizer = _train_tokenizer(cfg, train_examples, load)
        if primary:  # the run's vocabulary lives with its checkpoints
            _publish_tokenizer(load, saved)
        return tokenizer
    tokenizer = _train_tokenizer(cfg, train_examples, saved if primary else None)
    if primary:
        integrity.record_tree(saved)
    return tokenizer


def _check_saved_tokenizer(saved: str) -> bool | None:
    """None when the workdir has no saved tokenizer; True when it matches its integrity record;
    False when it has none. Raises IntegrityError (refusing it) when it differs."""
    if not storage.isdir(saved):
        return None
    try:
        integrity.verify_tree(saved, "the run's trained tokenizer", strict=True)
    except integrity.MissingRecord:
        return False
    except integrity.IntegrityError as e:
        raise integrity.IntegrityError(
            f"tokenizer: refusing to resume: {e}. The run's checkpoints were trained with the "
            f"recorded tokenizer; restore it, or use a new workdir") from None
    return True


def _publish_tokenizer(local: str, saved: str):
    """Copies a tokenizer trained into a host-local directory to the (remote) workdir, with its
    integrity record last: a kill during the copy leaves a tokenizer without a record (checked
    against a retrained one on resume), never a record listing files not yet copied."""
    integrity.record_tree(local)
    names = sorted(storage.files(local))
    for rel in [n for n in names if n != integrity.TREE_RECORD] + [integrity.TREE_RECORD]:
        storage.copy_file(storage.join(local, *rel.split("/")), storage.join(saved, rel))


def _adopt_unrecorded(cfg, train_examples, saved: str, load: str):
    """A saved tokenizer without an integrity record is used only if it is byte for byte the one
    the task data trains (then process 0 records it); otherwise IntegrityError refuses it."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        fresh = os.path.join(tmp, "tokenizer")
        _train_tokenizer(cfg, train_examples, None).save(fresh)
        want = {n: open(os.path.join(fresh, n), "rb").read() for n in os.listdir(fresh)}
    have = storage.files(load)
    for name in sorted(set(want) | set(have)):
        if name not in have or name not in want or storage.read_bytes(
                os.path.join(load, name)) != want[name]:
            how = ("is missing" if name not in have else "is not part of a trained tokenizer"
                   if name not in want else "differs from the tokenizer this run's task data "
                   "trains")
            raise integrity.IntegrityError(
                f"tokenizer: refusing to resume: {storage.join(saved, name)} {how}, and {saved} "
                f"has no integrity record ({integrity.TREE_RECORD}: written by an older trustrl, "
                f"or a kill before the record) to tell whether it is the run's original. If it "
                f"is, record it (python -m trustrl.infra.integrity record {saved}); else use a new "
                f"workdir")
    if jax.process_index() == 0:
        integrity.record_tree(saved)
    print(f"tokenizer: {saved} had no integrity record; it is identical to the tokenizer the "
          f"task data trains, recorded it", flush=True)


def _train_tokenizer(cfg, train_examples, save_dir) -> Tokenizer:
    texts = [f"{ex['prompt']} {ex['answer']}" for ex in train_examples]
    texts += [data.format_prompt(ex, "plain") for ex in train_examples[:64]]
    filler = tasks.filler_config(cfg.task)
    if filler is not None:  # the long tail of the vocabulary comes from the filler text
        rng = np.random.default_rng([cfg.task.seed, 5])
        texts += [" " + tasks.filler_text(rng, **filler) + "\nAnswer:" for _ in range(20000)]
    return train_bpe(texts, cfg.tokenizer.vocab_size, save_dir=save_dir,
                     split_digits=cfg.tokenizer.split_digits)


def _saved_tokenizer(load: str, saved: str, recorded: bool | None) -> Tokenizer | None:
    """The trained tokenizer a previous start of the run saved (``saved``, loaded from ``load``:
    the same directory, or its local copy), or None if there is none or, without an integrity
    record, it is incomplete (a kill during an older, non-atomic save): then process 0 keeps it
    aside (renamed, never deleted) and it is trained again, which gives the identical vocabulary
    (BPE training is deterministic in its input)."""
    if recorded is None or not os.path.exists(load) and not recorded:
        if recorded is not None and jax.process_index() == 0:  # unrecorded, tokenizer.json gone
            print(f"tokenizer: {saved} is incomplete (no tokenizer.json), training it again; "
                  f"kept it as {integrity.keep_aside(saved)}", flush=True)
        return None
    try:
        tokenizer = Tokenizer.from_dir(load)
        if tokenizer.eos_id is None:  # without it the warm start and sampler have no stop token
            raise ValueError(f"{saved}/tokenizer_config.json names no eos_token of the vocabulary")
    except (OSError, ValueError) as e:
        if recorded:  # it is what the run recorded: nothing to rebuild it from that is the same
            raise integrity.IntegrityError(f"tokenizer: {saved} matches its integrity record "
                                           f"but cannot be used: {e}") from None
        aside = integrity.keep_aside(saved) if jax.process_index() == 0 else None
        print(f"tokenizer: {saved} is incomplete, training it again: {e}"
              + (f"; kept it as {aside}" if aside else ""), flush=True)
        return None
    return tokenizer


def model_config(cfg, vocab_size: int) -> ModelConfig:
    """The model built from cfg.model's fields: llama-like, or with model.num_experts > 0 a
    qwen3_moe mixture of experts (qwen3 attention; its layers scanned when they are alike, all
    sparse or all dense, else unrolled: scan_layers=False)."""
    m = cfg.model
    moe = {}
    if m.get("num_experts", 0) > 0:
        moe = dict(family="qwen3_moe", num_experts=m.num_experts,
                   num_experts_per_tok=m.num_experts_per_tok,
                   moe_intermediate_size=m.moe_intermediate_size,
                   norm_topk_prob=bool(m.norm_topk_prob),
                   decoder_sparse_step=m.decoder_sparse_step,
                   mlp_only_layers=tuple(m.mlp_only_layers), scan_layers=False)
    model_cfg = ModelConfig(
        vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim, rope_theta=m.rope_theta, tie_word_embeddings=m.tie_word_embeddings,
        param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat, **moe)
    if moe and len(model_cfg.sparse_layers) in (0, model_cfg.num_layers):  # alike: scanned
        model_cfg = dataclasses.replace(model_cfg, scan_layers=True)
    return with_run_fields(cfg, model_cfg)


def with_run_fields(cfg, model_cfg: ModelConfig) -> ModelConfig:
    """``model_cfg`` (built from the fields, a HF config.json or a preset) with the config's
    kernel choices, which no checkpoint carries: model.attention and, for a mixture of experts,
    model.moe_impl / model.moe_capacity_factor."""
    m = cfg.model
    kernels = dict(attention=m.get("attention", "auto"))
    if model_cfg.num_experts > 0:
        kernels.update(moe_impl=m.get("moe_impl", "ragged"),
                       moe_capacity_factor=float(m.get("moe_capacity_factor", 0.0)))
    return dataclasses.replace(model_cfg, **kernels)


def _sampler_cfg(cfg, tokenizer, *, greedy: bool, record_topk: bool | None = None,
                 record_routes: bool = False, dial: bool = False) -> SamplerConfig:
    """The run's sampler settings. mu's top-K is recorded (rollout.record_topk) only where it
    is read: ``record_topk`` None = when the loss method is a top-K one (greedy: never).
    ``record_routes``: record the experts a mixture of experts routed every token to (R3 and the
    routing metrics; never when greedy). ``dial``: with the mismatch dial's sampler-side
    sources (rollout.mismatch noise / traps; the rollout sampler only, never greedy)."""
    eos = tuple(i for i in (tokenizer.eos_id,) if i is not None)
    if record_topk is None:
        record_topk = losses.METHODS[cfg.loss.method].divergence == "topk"
    return SamplerConfig(
        max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
        top_p=1.0 if greedy else cfg.rollout.top_p, top_k=0 if greedy else cfg.rollout.top_k,
        greedy=greedy, eos_ids=eos,
        record_topk=cfg.rollout.record_topk if record_topk and not greedy else 0,
        max_rows=cfg.rollout.max_rows, continuous=cfg.rollout.continuous,
        refill_rows=cfg.rollout.refill_rows, record_routes=bool(record_routes and not greedy),
        **(mismatch.sampler_fields(cfg) if dial and not greedy else {}))


def _filter(cfg, env, model_cfg, tokenizer, params, mesh, workdir):
    """Narrows env.train to the problems in the base's solve band (when task.filter_samples)."""
    if not cfg.task.filter_samples:
        return
    warm_key = warmstart.cache_key(cfg, env, model_cfg)
    info = filtering.filter_train(cfg, env, model_cfg, _sampler_cfg(cfg, tokenizer, greedy=False),
                                  params, mesh, warm_key)
    if multihost.is_primary():  # what this run trained on, with its integrity record
        _record_filter(storage.join(workdir, "filter.json"),
                       json.dumps({k: v for k, v in info.items() if k != "rates"}))
    env.train = [env.train[i] for i in info["kept"]]


def _record_filter(path: str, text: str):
    """Writes WORKDIR/filter.json and its integrity record. The one an earlier start wrote is
    replaced only when it is identical; otherwise (damaged, unrecorded, or another filter) it
    is kept aside (renamed, reported in one line), never overwritten."""
    if storage.exists(path):
        why = None
        try:
            if integrity.read_file(path, "the run's training-set filter") != text.encode():
                why = "it differs from the filter this start computed"
        except integrity.IntegrityError as e:
            why = str(e)
        if why:
            print(f"filter: {path}: {why}; kept it as {integrity.keep_aside(path)}", flush=True)
    integrity.write_file(path, text)


def data_fingerprint(env) -> str:
    """sha256 of the run's train and test examples in order (what every process must share)."""
    h = hashlib.sha256()
    for split in (env.train, env.test):
        h.update(str(len(split)).encode())
        for ex in split:
            h.update(json.dumps(ex, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def build(cfg, workdir: str, mesh=None, sampler_meshes=None) -> Run:
    """Everything a run needs; ``mesh``: the device mesh of cfg.mesh (made here when None).
    ``sampler_meshes``: a split layout's sampler replicas' sub-meshes (all of them;
    trustrl.training.async_rollouts.meshes); the rollouts are then sampled on this process's
    replicas (``Run.sampler_replicas``), and ``mesh`` (the trainer's) runs everything else,
    evaluation included."""
    mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
    # the reward model first: a directory that is not one fails before any data or warm start
    scorer = reward_scorer(cfg, mesh) if rlhf.enabled(cfg) else None
    data_dir = cfg.task.data_dir or os.path.join(storage.local_dir(workdir), "data")
    train_ex = data.load_examples(cfg.task, "train", data_dir, seed=cfg.task.seed)
    test_ex = data.load_examples(cfg.task, "test", data_dir, seed=cfg.task.seed)
    with multihost.primary_first("tokenizer"):  # process 0 trains and saves, the others load
        tokenizer = _tokenizer(cfg, workdir, [train_ex[i] for i in range(min(len(train_ex), 5000))])
    env = TaskEnv(tokenizer, cfg.task.name, cfg.task.template, train_ex, test_ex,
                  cfg.task.reward_correct, cfg.task.reward_wrong)

    key = jax.random.key(cfg.seed)
    k_init, key = jax.random.split(key)
    if cfg.warmstart.steps > 0:  # the warm-started base is shared by every RL seed
        k_init = jax.random.key(cfg.warmstart.seed)
    if cfg.model.hf_dir:
        model_cfg, params = hf.load_hf_dir(cfg.model.hf_dir, mesh=mesh,
                                           param_dtype=cfg.model.param_dtype,
                                           dtype=cfg.model.dtype, remat=cfg.model.remat)
        model_cfg = with_run_fields(cfg, model_cfg)
    else:
        model_cfg = model_config(cfg, tokenizer.vocab_size)
        params = init_params(model_cfg, k_init, mesh)
    cv.check_built(cfg, tokenizer.vocab_size, model_cfg, mesh)  # before any training
    # the base (warm start + training-set filter) may be built at another compute dtype than
    # the trainer's, so that e.g. a bf16-compute trainer starts from the fp32 runs' base
    base_cfg = (dataclasses.replace(model_cfg, dtype=cfg.warmstart.dtype)
                if cfg.warmstart.dtype else model_cfg)
    if cfg.warmstart.steps > 0:
        params = warmstart.warm_start(cfg, env, base_cfg, params, mesh)

    _filter(cfg, env, base_cfg, tokenizer, params, mesh, workdir)

    frozen = base_id = None
    if lora_enabled(cfg):  # the state trains adapters on the frozen base
        base_id = lora_base_id(cfg, params)
        model_cfg = with_lora(cfg, model_cfg)
        frozen, params = lora_params(cfg, model_cfg, params, jax.random.fold_in(k_init, 1), mesh)
    tx = optimizer(cfg)
    state_sh = ts.state_shardings(model_cfg, tx, mesh)
    state = ts.init_program(tx, state_sh)(params)

    roll_cfg = policy.rollout_config(lora.merged_config(model_cfg), cfg.rollout.dtype,
                                     cfg.rollout.head_dtype)
    sampler, eval_greedy = samplers(cfg, tokenizer, roll_cfg, mesh)
    runs_episodes = episodes_lib.enabled(cfg)
    eps = (episodes_lib.build(cfg, tokenizer, roll_cfg, sampler.cfg, eval_greedy.cfg, mesh)
           if runs_episodes else None)
    source = episodes_lib.train_seeds(cfg) if runs_episodes else env.train
    reward = reference = None
    if rlhf.enabled(cfg):
        reward = rlhf.RewardModelReward(cfg, mesh, *scorer,
                                        ground_truth=preferences.ground_truth_fn(cfg.task))
        if cfg.reward_model.kl_coef:  # pi_ref: the policy before any RL update
            reference = rlhf.reference_params(state.params)  # LoRA: the adapters only
    return Run(
        cfg=cfg, mesh=mesh, env=env, model_cfg=model_cfg, rollout_cfg=roll_cfg, state=state,
        key=key, episodes=eps,
        prompt_iter=data.PromptIterator(source, cfg.rollout.prompts_per_iter, seed=cfg.seed),
        sampler=sampler, eval_greedy=eval_greedy,
        rollout_params=rollout_params_program(model_cfg, roll_cfg, frozen),
        score=score_program(cfg, model_cfg, mesh),
        train_step=train_step_program(cfg, model_cfg, roll_cfg, tx, state_sh, mesh),
        frozen=frozen, base_id=base_id, reward=reward, reference=reference,
        sampler_replicas=None if sampler_meshes is None else tuple(
            (r, m, split_sampler(cfg, tokenizer, roll_cfg, m))
            for r, m in async_rollouts.own_replicas(sampler_meshes)))


def reward_scorer(cfg, mesh):
    """((config, params, jitted score program), tokenizer) of reward_model.hf_dir on ``mesh``,
    in reward_model.dtype (trustrl.reward_model; aot_check's "reward" phase compiles the
    program), with reward_model.tokenizer (or the directory's own)."""
    rm = cfg.reward_model
    try:
        config, params = reward_model.load_hf_dir(rm.hf_dir, mesh=mesh, param_dtype=rm.dtype,
                                                  dtype=rm.dtype)
    except (OSError, KeyError, ValueError) as e:  # each names the file and the field
        raise ValueError(f"reward_model.hf_dir={rm.hf_dir!r}: {e}") from None
    return (config, params, reward_model.score_program(config, mesh)), Tokenizer.from_dir(
        rm.get("tokenizer", "") or rm.hf_dir)


def rollout_params_program(model_cfg, roll_cfg, frozen=None):
    """state.params -> the rollout engine's parameters (``roll_cfg``'s dtypes): a cast, or for
    LoRA ``merge_program`` on the run's frozen base, once per iteration (benchmarks/lora.py
    times it). A copy even when the dtypes agree: train_step donates the state the params
    live in."""
    if frozen is None:
        return jax.jit(lambda p: jax.tree.map(jnp.copy, policy.cast_params(p, roll_cfg)))
    program = merge_program(model_cfg, roll_cfg)
    return lambda adapters: program(adapters, frozen)


def merge_program(model_cfg, roll_cfg):
    """The jitted (adapters, frozen base) -> rollout parameters of a LoRA run: the adapters
    merged into the base (``lora.merge``) and cast to ``roll_cfg``'s dtypes, one program (what
    trustrl.tools.aot_check compiles as its "merge" phase)."""
    def merged(adapters, frozen):
        params = lora.merge(lora.combine(frozen, adapters), model_cfg)[0]
        return jax.tree.map(jnp.copy, policy.cast_params(params, roll_cfg))

    return jax.jit(merged)


def lora_enabled(cfg) -> bool:
    """model.lora.rank > 0: the run trains LoRA adapters on a frozen base."""
    return int(cfg.model.get("lora", {}).get("rank", 0)) > 0


def with_lora(cfg, model_cfg: ModelConfig) -> ModelConfig:
    """``model_cfg`` with cfg.model.lora's adapters and base storage (model.lora.base_quant:
    the frozen base's int8 / fp8 kernels, QLoRA-style); unchanged without LoRA."""
    if not lora_enabled(cfg):
        return model_cfg
    spec = cfg.model.lora
    return dataclasses.replace(model_cfg, lora_rank=int(spec.rank), lora_alpha=float(spec.alpha),
                               lora_targets=tuple(spec.targets), lora_init=str(spec.init),
                               weight_quant=str(spec.get("base_quant", "")))


def lora_params(cfg, model_cfg: ModelConfig, base, key, mesh):
    """(frozen base, adapters) of a LoRA run: the base as built (warm start included) in its
    storage dtype, quantised under model.lora.base_quant, placed like the kernels; the
    adapters from model.lora.init_from (a PEFT directory) or freshly initialised."""
    base_sh, adapter_sh = lora.split(model_lib.param_shardings(model_cfg, mesh))
    if model_cfg.weight_quant:
        kind, stacked = model_cfg.weight_quant, model_cfg.scan_layers
        base = jax.jit(lambda p: quant.quantize_params(p, kind, stacked), out_shardings=base_sh,
                       donate_argnums=0)(base)
    if cfg.model.lora.get("init_from", ""):
        from trustrl.model import peft  # the PEFT adapter format (safetensors)
        adapters = peft.load_adapters(cfg.model.lora.init_from, model_cfg, shardings=adapter_sh)
    else:
        adapters = model_lib.init_adapters(model_cfg, key, mesh)
    return base, adapters


def lora_base_id(cfg, base) -> dict:
    """What a LoRA checkpoint's adapters were trained on: model.hf_dir's path and the sha256
    of its config and weight files, or (a base built from the config's fields and warm start)
    the sha256 of the base parameters' bytes."""
    if cfg.model.hf_dir:
        files = sorted(f for f in os.listdir(cfg.model.hf_dir)
                       if f.endswith(".safetensors") or f == "config.json")
        h = hashlib.sha256()
        for f in files:
            h.update(f.encode())
            h.update(integrity.file_digest(os.path.join(cfg.model.hf_dir, f))["sha256"].encode())
        return {"path": cfg.model.hf_dir, "sha256": h.hexdigest()}
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(base):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(multihost.to_host(leaf)).tobytes())
    return {"path": "", "sha256": h.hexdigest()}


def check_base(run: Run, saved: dict | None, directory: str):
    """A LoRA checkpoint restores only onto the base it was trained on (ValueError naming
    model.hf_dir and both identities); a checkpoint without LoRA, or a run without, passes."""
    if run.base_id is None and saved is None:
        return
    if run.base_id is None or saved is None:
        have = "LoRA adapters" if saved is not None else "full parameters"
        raise ValueError(f"the checkpoint in {directory} holds {have}, but this run "
                         f"{'trains LoRA adapters' if run.base_id else 'has no LoRA'} "
                         f"(model.lora.rank): use a new workdir")
    if saved != run.base_id:
        raise ValueError(
            f"the checkpoint in {directory} holds LoRA adapters trained on another base: "
            f"model.hf_dir {saved.get('path')!r} (sha256 {str(saved.get('sha256'))[:12]}...) "
            f"vs this run's {run.base_id['path']!r} (sha256 {run.base_id['sha256'][:12]}...); "
            f"resume with the same base, or use a new workdir")


# The run's jitted programs and the shapes they are compiled for, built here for both the run
# (``build``) and trustrl.tools.aot_check, so what aot_check compiles is what the run executes.


def optimizer(cfg):
    """The run's optimizer over all its optimizer steps (iterations x epochs x minibatches)."""
    total_steps = cfg.train.iterations * cfg.train.epochs * cfg.train.minibatches
    return optim.make_optimizer(cfg.optim, total_steps)


def routing_replay(cfg) -> bool:
    """model.routing_replay (R3): the score pass and the train step replay the rollout's
    recorded experts (trustrl.training.step.replay_routes)."""
    return bool(cfg.model.get("routing_replay", False))


def batch_spec(cfg, sampler_cfg: SamplerConfig, rows: int, prompt_width: int, mesh, *,
               old_logp: bool, model_cfg: ModelConfig | None = None) -> dict:
    """The sharded abstract batch (jax.ShapeDtypeStructs) of ``rows`` rollouts of
    ``prompt_width`` + rollout.max_new_tokens tokens, with mu's top-K where the sampler records
    it, ``old_logp`` where the run keeps it and, with routing replay, the recorded experts of
    ``model_cfg``: what the score pass and the train step run on."""
    replay = routing_replay(cfg) and sampler_cfg.record_routes
    if replay and model_cfg is None:
        raise ValueError("batch_spec: routing replay batches carry the recorded experts; pass "
                         "model_cfg (the mixture of experts)")
    shapes = ts.batch_shapes(rows, prompt_width, cfg.rollout.max_new_tokens,
                             topk=sampler_cfg.record_topk, old_logp=old_logp,
                             routed_experts=model_cfg if replay else None)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                    sharding=sharding.batch_sharding(mesh, len(v.shape)))
            for k, v in shapes.items()}


def samplers(cfg, tokenizer, roll_cfg, mesh) -> tuple[Sampler, Sampler]:
    """(the rollout sampler, also evaluation's pass@k sampler; the greedy evaluation sampler).
    ``tokenizer``: anything with an ``eos_id``. The rollout sampler of a mixture of experts
    records the experts it routed every token to (Rollout.routed_experts); it carries the
    mismatch dial's noise / traps (pass@k then samples the noised policy, as it samples the
    rollout's precision), the greedy one does not."""
    batch_sharding = sharding.batch_sharding(mesh)
    moe = bool(roll_cfg.sparse_layers)  # a mixture of experts records its routing (R3, metrics)
    return tuple(Sampler(policy.decode_model(roll_cfg),
                         _sampler_cfg(cfg, tokenizer, greedy=g, record_routes=moe, dial=not g),
                         batch_sharding=batch_sharding) for g in (False, True))


def split_sampler(cfg, tokenizer, roll_cfg, sampler_mesh):
    """A split layout's rollout sampler on the sampler mesh; decoding in segments that may
    change weights (trustrl.rollout.partial) with train.partial_rollouts > 0 in async mode."""
    sampler = samplers(cfg, tokenizer, roll_cfg, sampler_mesh)[0]
    chunk = int(cfg.train.get("partial_rollouts", 0))
    if chunk and cfg.train.mode == "async":
        from trustrl.rollout.partial import PartialSampler
        return PartialSampler(sampler, chunk)
    return sampler


def score_program(cfg, model_cfg, mesh):
    """score(params, batch) -> pi_old log-probs of the whole iteration, in
    ``score_microbatches(cfg)`` parts."""
    return jax.jit(functools.partial(ts.score, model_cfg=model_cfg,
                                     temperature=float(cfg.rollout.temperature), mesh=mesh,
                                     microbatches=cv.score_microbatches(cfg),
                                     routing_replay=routing_replay(cfg)))


def train_step_program(cfg, model_cfg, roll_cfg, tx, state_sh, mesh):
    """train_step(state, minibatch, rollout_params, frozen=None) -> (state, metrics); the state
    is donated and keeps its layout (one compile); ``frozen``: a LoRA run's base (Run.frozen)."""
    return jax.jit(functools.partial(ts.train_step, model_cfg=model_cfg, loss_cfg=cfg.loss, tx=tx,
                                     mesh=mesh, rollout_model_cfg=roll_cfg,
                                     temperature=float(cfg.rollout.temperature),
                                     microbatches=cfg.train.microbatches,
                                     routing_replay=routing_replay(cfg),
                                     router_aux_loss_coef=float(
                                         cfg.model.get("router_aux_loss_coef", 0.0))),
                   donate_argnums=(0,), out_shardings=(state_sh, NamedSharding(mesh, P())))
