r"""Trains a reward model from preference pairs (Bradley-Terry) and saves it as a Hugging Face
sequence-classification directory.

    python -m trustrl.tools.train_reward_model --config=configs/reward_model.py[:VARIANT] \
        --workdir=W --out=DIR [--config.FIELD=VALUE ...]

W receives ``metrics.jsonl`` (the held-out pair accuracy before training, every
``train.eval_every`` steps and at the end; the Bradley-Terry loss every step) and the built
pair dataset; DIR the reward model (``config.json`` with architectures
[<Family>ForSequenceClassification], num_labels 1 and pad_token_id, ``model.safetensors``, the
tokenizer with its chat template), which ``transformers.AutoModelForSequenceClassification``
and ``trustrl.reward_model.load_hf_dir`` load with the same scores, and which an RL run uses as
``--config.reward_model.hf_dir=DIR`` (configs/rlhf.py). DIR must not exist or be empty; it is
written in DIR.partial and renamed when complete. See trustrl.training.reward_training.

A bad flag or config value, or a non-empty --out, exits 2 with one line; a failure while
training exits 1 with one ``error: ...`` line, last on stderr.
"""
from __future__ import annotations

import os
import shutil
import sys

USAGE = ("usage: python -m trustrl.tools.train_reward_model --config=FILE[:VARIANT] --workdir=W "
         "--out=DIR [--config.FIELD=VALUE ...]")


def _main(argv):
    from trustrl.training import reward_training
    cfg, workdir, out = _CONFIG.value, _WORKDIR.value, _OUT.value
    partial = out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by a killed export of this same DIR
    try:
        params, rm_cfg, tokenizer, metrics = reward_training.train(cfg, workdir)
        reward_training.export(params, rm_cfg, tokenizer, partial)
        if os.path.isdir(out):  # empty (checked before training)
            os.rmdir(out)
        os.rename(partial, out)
    except Exception as e:  # noqa: BLE001 - one error line, the traceback above it
        import traceback
        traceback.print_exc()
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    acc = metrics.get("eval/accuracy", float("nan"))
    print(f"reward model: held-out pair accuracy {acc:.3f} ({metrics.get('eval/num_pairs')} "
          f"pairs); saved to {out}")


def main():
    from absl import app, flags
    from ml_collections import config_flags
    global _CONFIG, _WORKDIR, _OUT
    _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/reward_model.py[:variant]",
                                              lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "metrics and data directory")
    _OUT = flags.DEFINE_string("out", None, "the Hugging Face directory to write")
    argv = sys.argv
    try:
        flags.FLAGS(argv)
    except (flags.Error, ValueError, KeyError, AttributeError) as e:
        print(f"{USAGE}: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    for name, value in (("--config", _CONFIG.value), ("--workdir", _WORKDIR.value),
                        ("--out", _OUT.value)):
        if not value:
            print(f"{USAGE}: {name} is required", file=sys.stderr)
            sys.exit(2)
    if os.path.exists(_OUT.value) and (not os.path.isdir(_OUT.value) or os.listdir(_OUT.value)):
        print(f"train_reward_model: --out={_OUT.value} exists and is not an empty directory; "
              f"choose another", file=sys.stderr)
        sys.exit(2)
    app.run(_main, argv=argv[:1])


if __name__ == "__main__":
    main()
