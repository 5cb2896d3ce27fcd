"""A workdir's provenance: which config it was started with and what may change on resume.

* ``check_resume(cfg, workdir)``: a workdir with checkpoints may only be resumed with the config
  recorded by its first run (``workdir/config.json``, see ``record_config``), up to the fields in
  ``OPERATIONAL`` and a longer ``train.iterations``; each checkpoint keeps a copy of the config
  (``checkpoint_config``).
* ``latest_checkpoint(workdir)``: the newest checkpointed iteration, without creating anything.
"""
from __future__ import annotations

import json

CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.jsonl"
# Fields that change how a run is operated, not what it computes: they may differ on resume.
# (mesh: the checkpoint is restored into the new layout; only rounding can differ.)
OPERATIONAL = ("log.", "mesh.", "sampler_mesh.", "eval.every", "checkpoint.every",
               "checkpoint.max_to_keep", "task.data_dir", "warmstart.cache_dir",
               "train.microbatches",  # exact gradient accumulation: memory, not the update
               "train.score_microbatches",  # the score pass in parts: memory, not the values
               "rollout.keep_kv_cache",  # memory between iterations, not the rollouts
               "model.attention",  # the kernel, not the math (backends agree to float error)
               # how the reward model's rows are batched and padded (right padding: exact)
               "reward_model.batch_size", "reward_model.bucket",
               # benchmark-only sleeps (emulated device time), not the math
               "train.emulate_sample_s", "train.emulate_train_s")


def latest_checkpoint(workdir: str):
    """The latest checkpointed iteration in workdir, or None. Creates nothing."""
    from trustrl.infra import storage
    directory = storage.join(workdir, "checkpoints")
    if not storage.isdir(directory):
        return None
    import orbax.checkpoint as ocp
    steps = ocp.path.step.checkpoint_steps(directory)  # finalized steps only, as Orbax restores
    return max(steps) if steps else None


def flatten(cfg) -> dict:
    """{"loss.method": ..., ...} of a ConfigDict (or nested dict), values as JSON reads them."""
    nested = json.loads(json.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg))
    out = {}

    def walk(prefix, node):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                out[prefix + k] = v
    walk("", nested)
    return out


_ABSENT = "<absent>"
# Fields added after runs were recorded, with the value that reproduces the older behaviour: a
# recorded config without the field equals one that has it at this value.
# rollout.continuous is the exception: True (the new default) has no effect with max_rows = 0,
# and with max_rows > 0 it draws rollouts from the same distribution as the older split calls.
ADDED_FIELDS = {"rollout.max_rows": 0, "rollout.head_dtype": "", "rollout.continuous": True,
                "rollout.refill_rows": 0, "warmstart.dtype": "", "model.attention": "auto",
                "train.score_microbatches": 0, "rollout.keep_kv_cache": True,
                # mixture of experts (issue 28): num_experts 0 is the dense model every older
                # run trained; the other fields are unused by it (values as JSON reads them)
                "model.num_experts": 0, "model.num_experts_per_tok": 0,
                "model.moe_intermediate_size": 0, "model.norm_topk_prob": True,
                "model.decoder_sparse_step": 1, "model.mlp_only_layers": [],
                "model.moe_impl": "ragged", "model.moe_capacity_factor": 0.0,
                "model.router_aux_loss_coef": 0.0, "model.routing_replay": False,
                # LoRA (issue 29): rank 0 is the full fine-tuning every older run did
                "model.lora.rank": 0, "model.lora.alpha": 0.0, "model.lora.targets": [],
                "model.lora.init": "kaiming", "model.lora.base_quant": "",
                "model.lora.init_from": "",
                # environment episodes (issue 30): id "" is the single-turn task of older runs
                "env.id": "", "env.template": "plain", "env.max_turns": 4,
                "env.max_turn_tokens": 8, "env.max_total_tokens": 64, "env.advantage": "episode",
                "env.kwargs": {},
                # learned reward models (issue 31): hf_dir "" is the verifier reward of older runs
                "reward_model.hf_dir": "", "reward_model.tokenizer": "",
                "reward_model.dtype": "bfloat16", "reward_model.template": "chat",
                "reward_model.max_length": 2048, "reward_model.truncation": "right",
                "reward_model.batch_size": 0, "reward_model.bucket": 64,
                "reward_model.normalize": "none", "reward_model.clip": 0.0,
                "reward_model.length_penalty": 0.0, "reward_model.kl_coef": 0.0,
                # the trust-region family (issue 32): read only by the new loss methods
                "loss.icepop_low": 0.5, "loss.icepop_high": 5.0, "loss.kpop_phi": 2.0,
                "loss.opsm_delta": 1e-4, "loss.geo_low": 0.99, "loss.geo_high": 1.01,
                "loss.drpo_eps": 12.5, "loss.m2po_threshold": 0.04,
                "loss.cppo_delta": 0.15, "loss.cppo_w_min": 0.8, "loss.cppo_delta_b": 0.02,
                # the mismatch dial (issue 32): all off is what every older run did
                "rollout.mu": "sampler", "rollout.mismatch.noise": 0.0,
                "rollout.mismatch.staleness": 0, "rollout.mismatch.pre_temperature": False,
                "rollout.mismatch.top_p_renorm": False,
                # asynchronous RL (issue 33): sync on the whole mesh is what every older run did
                "sampler_mesh.devices": 0.0, "sampler_mesh.data": -1, "sampler_mesh.fsdp": 1,
                "sampler_mesh.tensor": 1, "sampler_mesh.replicas": 1, "train.mode": "sync",
                "train.max_staleness": 1, "train.rollout_version": "newest",
                "train.sync_every": 1, "train.partial_rollouts": 0,
                "train.emulate_sample_s": 0.0,
                "train.emulate_train_s": 0.0}


def config_changes(old: dict, new: dict):
    """(semantic, operational) lists of (field, old, new) between two flat configs. A longer
    train.iterations is operational; a shorter one is semantic (the run would stop early)."""
    semantic, operational = [], []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, ADDED_FIELDS.get(k, _ABSENT)), new.get(k, ADDED_FIELDS.get(k, _ABSENT))
        if a == b:
            continue
        extends = (k == "train.iterations" and isinstance(a, int) and isinstance(b, int)
                   and b > a)
        (operational if extends or k.startswith(OPERATIONAL) else semantic).append((k, a, b))
    return semantic, operational


def _describe(changes) -> str:
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes)


def checkpoint_config(workdir: str, step: int) -> dict | None:
    """The config a checkpoint recorded in its host state (``config``), or None when the step
    has none (saved by an older trustrl). The host state is Orbax's JSON item ``host``, covered
    by the step's sha256 manifest."""
    from trustrl.infra import storage
    host_dir = storage.join(workdir, "checkpoints", str(step), "host")
    for name in ("metadata",):  # Orbax's JsonSave file name (0.11 .. 0.12)
        path = storage.join(host_dir, name)
        if storage.exists(path):
            try:
                host = json.loads(storage.read_text(path))
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise ValueError(f"cannot read {path}, the host state of checkpoint {step}: "
                                 f"{type(e).__name__}: {e}") from None
            config = host.get("config") if isinstance(host, dict) else None
            return config if isinstance(config, dict) else None
    return None


def recorded_config(workdir: str, step: int, allow_changes: bool = False):
    """(the run's recorded config as a nested dict, where it came from, notices).

    ``workdir/config.json`` checked against its integrity record (an edited or truncated
    config.json is refused: it no longer says what the run was); without config.json, the copy
    in checkpoint ``step``. Neither: a ValueError unless ``allow_changes`` (then None)."""
    from trustrl.infra import integrity, storage
    path = storage.join(workdir, CONFIG_FILE)
    notices = []
    if storage.exists(path):
        try:
            raw = integrity.read_file(path, "the config of the run being resumed")
        except integrity.MissingRecord:
            raw = storage.read_bytes(path)  # written before integrity records: trusted once
            notices.append(f"notice: {path} has no integrity record (written by an older "
                           f"trustrl); it is recorded when this run starts")
        except integrity.IntegrityError as e:
            raise ValueError(f"{e}; restore the file (checkpoint {step} holds the run's config "
                             f"in its host state) or resume with a new --workdir") from None
        except OSError as e:
            raise ValueError(f"cannot read {path}, the config of the run being resumed: "
                             f"{e}") from None
        try:
            return json.loads(raw), path, notices
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"cannot read {path}, the config of the run being resumed: "
                             f"{e}") from None
    config = checkpoint_config(workdir, step)
    where = storage.join(workdir, "checkpoints", str(step), "host")
    if config is not None:
        notices.append(f"notice: {path} is missing; checking the config against the copy in "
                       f"checkpoint {step} ({where}); {CONFIG_FILE} is written again when this "
                       f"run starts")
        return config, where, notices
    if not allow_changes:
        raise ValueError(
            f"--workdir={workdir!r} has checkpoints (iteration {step}) but no {CONFIG_FILE}, and "
            f"checkpoint {step} holds no copy of the config (saved by an older trustrl), so "
            f"nothing says which config the run used; restore {path}, use a new --workdir, or "
            f"pass --allow_config_change to continue with this config")
    notices.append(f"warning: {workdir} has checkpoints (iteration {step}) but no recorded "
                   f"config; continuing with this one (--allow_config_change), recorded when "
                   f"the run starts")
    return None, None, notices


def check_resume(cfg, workdir: str, allow_changes: bool = False):
    """Compares cfg with the config recorded by the run in a workdir that has checkpoints
    (``recorded_config``).

    Returns (notices to print, semantic changes accepted by allow_changes, the checkpointed
    iteration or None). Raises ValueError listing every semantic change (old -> new) unless
    allow_changes. Writes nothing: the run records its config once it has started
    (``record_config``), so a resume that fails leaves the recorded config as it was.
    """
    step = latest_checkpoint(workdir)
    if step is None:
        return [], [], None
    old, path, notices = recorded_config(workdir, step, allow_changes)
    if old is None:
        return notices, [], step
    semantic, operational = config_changes(flatten(old), flatten(cfg))
    for k, a, b in operational:
        if k == "train.iterations":
            mult = cfg.train.epochs * cfg.train.minibatches
            notices.append(
                f"notice: extending the run from {a} to {b} iterations (resuming at iteration "
                f"{step}); the optimizer's total steps change from {a * mult} to {b * mult}, "
                f"so a learning-rate schedule over them (trustrl.training.optim.make_optimizer) "
                f"changes from the resumed step on")
    others = [c for c in operational if c[0] != "train.iterations"]
    if others:
        notices.append(f"notice: resuming with changed operational fields: {_describe(others)}")
    if semantic and not allow_changes:
        raise ValueError(
            f"--workdir={workdir!r} has checkpoints (iteration {step}) of a run with a different "
            f"config ({path}): {_describe(semantic)}; rerun with the recorded values, use a new "
            f"--workdir, or pass --allow_config_change to continue with the new config")
    if semantic:
        from trustrl.infra import storage
        notices.append(f"warning: continuing the run from iteration {step} with a changed config "
                       f"(--allow_config_change): {_describe(semantic)}; recorded in "
                       f"{storage.join(workdir, CHANGES_FILE)} once the run has started")
    return notices, semantic, step


def record_config(cfg, workdir: str, changes=(), step=None):
    """Writes workdir/config.json atomically with its integrity record (trustrl.infra.integrity);
    appends accepted semantic changes, with the iteration they start at, to
    workdir/config_changes.jsonl. Called once the run has started (its checkpoint restored),
    so a failed start leaves the recorded config as it was."""
    from trustrl.infra import integrity, storage
    integrity.write_file(storage.join(workdir, CONFIG_FILE),
                         json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    if changes:
        storage.append(storage.join(workdir, CHANGES_FILE), (json.dumps(
            {"iteration": step, "changes": {k: [a, b] for k, a, b in changes}}) + "\n").encode())
