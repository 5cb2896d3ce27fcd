r"""Exports a run's checkpoint as a PEFT LoRA adapter or a merged Hugging Face model directory.

    python -m trustrl.tools.export --workdir=W [--step=N] --out=DIR --format=peft|merged

``peft``: ``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT writes a LoRA adapter
for the transformers model (trustrl.model.peft), with ``base_model_name_or_path`` = the run's
model.hf_dir, so ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir),
DIR)`` is the trained policy. Only for LoRA runs (model.lora.rank > 0). When the adapters were
trained on another base than model.hf_dir as stored (no model.hf_dir: a base built from the
config's fields; or warmstart.steps > 0: the warm start fine-tuned it), that base is written
too, as a Hugging Face directory DIR/base, and base_model_name_or_path names it (absolute).
A QLoRA run's (model.lora.base_quant) adapters are exported for the float base, as QLoRA
adapters are used (the merged format merges them into the dequantised base).
``merged``: ``config.json`` + ``model.safetensors`` (trustrl.model.hf.save_hf_dir) that
``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` loads: a LoRA run's adapters merged
into its base (W + alpha / r A @ B, in model.param_dtype; a quantised base dequantised), or a
full fine-tuning run's parameters.
Both get the run's tokenizer files (tokenizer.path, model.hf_dir, or the tokenizer the run
trained in WORKDIR/tokenizer), so DIR is self-contained.

The run is rebuilt from the workdir's recorded config (WORKDIR/config.json, or the copy in the
checkpoint) exactly as trustrl.main builds it (trustrl.training.experiment.build under the run's
mesh: same devices needed, e.g. XLA_FLAGS=--xla_force_host_platform_device_count=8 on CPU for
the tiny presets), so a LoRA run's frozen base (model.hf_dir, warm start included) is the one
the adapters were trained on; the checkpoint's recorded base identity is checked against it.
Checkpoint ``--step`` (default: the latest) is restored, without fallback to an earlier one.
DIR must not exist or be empty; it is written in DIR.partial and renamed when complete.
One process (not for multi-host runs' workdirs on several hosts at once).

Bad flags, a missing workdir, checkpoint or config, ``--format=peft`` of a run without LoRA, or a
non-empty --out exit 2 with one ``export: ...`` line; a failure while exporting (e.g. a
checkpoint of another base) exits 1 with one ``error: ...`` line, last on stderr.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

FORMATS = ("peft", "merged")
# what a Hugging Face model directory carries beside its weights (copied when present)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt")
# --format=peft of a run whose base is not model.hf_dir as stored (no model.hf_dir, or a warm
# start fine-tuned it): the base is written here, inside the adapter directory
BASE_SUBDIR = "base"
USAGE = ("usage: python -m trustrl.tools.export --workdir=W [--step=N] --out=DIR "
         "--format=peft|merged")


class _Usage(Exception):
    """A problem with the command line or its inputs: exit 2, one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's two lines (usage + error) -> one
        raise _Usage(f"{USAGE}: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m trustrl.tools.export", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="the run's directory (trustrl.main's)")
    p.add_argument("--step", type=int, default=None,
                   help="the checkpointed iteration to export (default: the latest)")
    p.add_argument("--out", required=True, help="the directory to write (new or empty)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="peft: a PEFT LoRA adapter (LoRA runs); merged: a Hugging Face model")
    return p


def _checkpoint_steps(workdir: str) -> list[int]:
    from trustrl.infra import storage
    directory = storage.join(workdir, "checkpoints")
    if not storage.isdir(directory):
        return []
    import orbax.checkpoint as ocp
    return sorted(ocp.path.step.checkpoint_steps(directory))


def _load_config(workdir: str, step: int):
    """The run's recorded config as a ConfigDict (JSON's lists where the config had tuples)."""
    import ml_collections

    from trustrl.training import resume
    recorded, _, _ = resume.recorded_config(workdir, step)
    return ml_collections.ConfigDict(recorded)


def _tokenizer_dir(cfg, workdir: str) -> str | None:
    """Where the run's tokenizer files are: tokenizer.path, model.hf_dir, or the one it
    trained (WORKDIR/tokenizer); None when there is none."""
    from trustrl.infra import storage
    for path in (cfg.tokenizer.get("path", ""), cfg.model.get("hf_dir", ""),
                 storage.join(workdir, "tokenizer")):
        if path and storage.isfile(storage.join(path, "tokenizer.json")):
            return path
    return None


def _copy_tokenizer(src: str | None, dst: str) -> list[str]:
    from trustrl.infra import storage
    copied = []
    for name in TOKENIZER_FILES if src else ():
        if storage.isfile(storage.join(src, name)):
            with open(os.path.join(dst, name), "wb") as f:
                f.write(storage.read_bytes(storage.join(src, name)))
            copied.append(name)
    return copied


def check_args(args) -> tuple[int, object]:
    """(the step to export, the run's config) after checking the flags against the workdir;
    _Usage naming the problem otherwise. Builds nothing."""
    from trustrl.infra import storage
    if not storage.isdir(args.workdir):
        why = "is not a directory" if storage.exists(args.workdir) else "does not exist"
        raise _Usage(f"--workdir={args.workdir}: the run directory {why}")
    steps = _checkpoint_steps(args.workdir)
    if not steps:
        raise _Usage(f"--workdir={args.workdir} has no checkpoints "
                     f"({storage.join(args.workdir, 'checkpoints')}): nothing to export")
    step = steps[-1] if args.step is None else args.step
    if step not in steps:
        raise _Usage(f"--step={step}: no such checkpoint in "
                     f"{storage.join(args.workdir, 'checkpoints')}; checkpointed steps: {steps}")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise _Usage(f"--out={args.out} exists and is not an empty directory; choose a new one")
    try:
        cfg = _load_config(args.workdir, step)
    except ValueError as e:
        raise _Usage(str(e)) from None
    from trustrl.training import experiment
    if args.format == "peft" and not experiment.lora_enabled(cfg):
        raise _Usage(f"--format=peft: the run in {args.workdir} trained every parameter "
                     f"(model.lora.rank=0), not LoRA adapters; use --format=merged for a Hugging "
                     f"Face directory of its parameters")
    return step, cfg


def _write_base(run, adapters, path: str):
    """The run's frozen base as a Hugging Face directory (dequantised under
    model.lora.base_quant, in model.param_dtype): merged with zero adapters, W + 0 = W."""
    import jax
    import jax.numpy as jnp

    from trustrl.model import hf, lora
    zeros = jax.tree.map(jnp.zeros_like, adapters)
    hf.save_hf_dir(_merge(lora.combine(run.frozen, zeros), run.model_cfg),
                   lora.merged_config(run.model_cfg), path)


def _merge(params, model_cfg):
    """lora.merge's parameters in one jitted program (the config is static)."""
    import jax

    from trustrl.model import lora
    return jax.jit(lambda p: lora.merge(p, model_cfg)[0])(params)


def export(workdir: str, step: int, cfg, out: str, fmt: str, log=print) -> str:
    """Rebuilds the run (experiment.build under its mesh), restores checkpoint ``step`` (its
    LoRA base checked), writes ``out`` in ``fmt``; returns ``out``."""
    import jax

    from trustrl.infra import checkpoint as ckpt_lib, sharding
    from trustrl.model import hf, lora, peft
    from trustrl.training import experiment

    if experiment.lora_enabled(cfg) and cfg.model.lora.get("init_from", ""):
        # the checkpoint replaces the adapters model.lora.init_from started from (and the base
        # does not depend on them): that directory need not exist any more
        cfg = cfg.copy_and_resolve_references()
        cfg.model.lora.init_from = ""
    mesh = sharding.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        run = experiment.build(cfg, workdir, mesh)
        ckpt = ckpt_lib.Checkpointer(workdir, cfg.checkpoint.max_to_keep)
        try:
            state, host = ckpt.restore(run.state, step)
        finally:
            ckpt.close()
        experiment.check_base(run, host.get("lora_base"), ckpt.directory)
        partial = out.rstrip("/") + ".partial"
        if os.path.exists(partial):
            shutil.rmtree(partial)
        os.makedirs(partial)
        if fmt == "peft":
            base_path = cfg.model.get("hf_dir", "")
            if not base_path or cfg.warmstart.steps > 0:  # the base is the run's own: written
                base_path = os.path.join(os.path.abspath(out), BASE_SUBDIR)
                _write_base(run, state.params, os.path.join(partial, BASE_SUBDIR))
            peft.save_adapters(state.params, run.model_cfg, partial,
                               base_model_name_or_path=base_path)
            what = (f"PEFT LoRA adapter (r={run.model_cfg.lora_rank}, alpha="
                    f"{run.model_cfg.lora_alpha}, {len(run.model_cfg.lora_targets)} targets) "
                    f"on {base_path}")
        else:
            params, model_cfg = run.policy_params(state.params), run.model_cfg
            if run.frozen is not None:
                params, model_cfg = _merge(params, model_cfg), lora.merged_config(model_cfg)
            hf.save_hf_dir(params, model_cfg, partial)
            what = ("Hugging Face model (LoRA merged into its base)" if run.frozen is not None
                    else "Hugging Face model")
    copied = _copy_tokenizer(_tokenizer_dir(cfg, workdir), partial)
    if os.path.isdir(out):
        os.rmdir(out)  # empty (checked)
    os.replace(partial, out)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    log(f"export: wrote checkpoint {step} of {workdir} as a {what} to {out} "
        f"({size / 2**20:.2f} MiB{', with the tokenizer' if copied else ''})")
    return out


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
        step, cfg = check_args(args)
    except _Usage as e:
        line = str(e)
        print(line if line.startswith("usage: ") else f"export: {line}", file=sys.stderr)
        return 2
    try:
        export(args.workdir, step, cfg, args.out, args.format)
    except Exception as e:  # noqa: BLE001 - one line naming the failure, exit 1
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: {type(e).__name__}: {text}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
