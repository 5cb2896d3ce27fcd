"""Command line: ``python -m trustrl.main --config=configs/default.py[:variant] --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.loss.method=dppo_binary_kl``. The config is
locked (a typo in a field name fails) and validated before anything runs.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumed if it has checkpoints).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first "
                               "(TPU pods / multi-host GPU; see launch/tpu_pod.sh).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax / tfds INFO lines drown the progress bar
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
    if _MULTIHOST.value:
        import jax
        jax.distributed.initialize()
    from trustrl import config_validation, train
    cfg = _CONFIG.value
    try:
        config_validation.validate(cfg)
    except ValueError as e:
        print(f"invalid config: {e}", file=sys.stderr)
        sys.exit(2)
    wd = _WORKDIR.value
    train.train(cfg, wd)
    from trustrl import metrics, plot
    rows = metrics.read_jsonl(f"{wd}/metrics.jsonl")
    plot.plot_runs([wd], f"{wd}/plots")
    first, last = rows[0], rows[-1]
    evals = [r for r in rows if "eval/pass@1" in r]
    print(f"training reward: {first['reward/mean']:.3f} (iteration {first['step']}) -> "
          f"{last['reward/mean']:.3f} (iteration {last['step']})")
    if evals:
        print(f"held-out greedy pass@1: {evals[0]['eval/pass@1']:.3f} -> "
              f"{evals[-1]['eval/pass@1']:.3f}")
    print(f"metrics: {wd}/metrics.jsonl  tensorboard: {wd}/tb  plots: {wd}/plots/*.png")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
