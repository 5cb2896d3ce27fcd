r"""Prints the training-inference mismatch a config's dial produces on its base policy.

    python -m trustrl.tools.calibrate_mismatch --config=FILE[:VARIANT] --workdir=W \
        [--config.rollout.mismatch.noise=0.05 ...] [--batches=2] [--json=OUT.json]

The run is built as ``trustrl.main`` would build it in W (tokenizer, data, warm start from
warmstart.cache_dir, training-set filter), so the base is the one an RL run starts from; see
trustrl.training.calibration for what is measured. Output: the settings, mean |pi - mu|, the
largest (pi - mu) either way, the largest ratio max(pi / mu, mu / pi), and a table by mu bucket
of the sampled token; ``--json`` also writes them. A study picks its dial settings from these
numbers (docs/trust_region_family.md), not from knob values.

A bad flag or config value exits 2 with one line; a failure while measuring exits 1 with one
``error: ...`` line, last on stderr.
"""
from __future__ import annotations

import json
import sys

USAGE = ("usage: python -m trustrl.tools.calibrate_mismatch --config=FILE[:VARIANT] --workdir=W "
         "[--config.FIELD=VALUE ...] [--batches=N] [--seed=S] [--json=PATH]")


def _main(argv):
    del argv
    from trustrl.training import calibration
    try:
        result = calibration.calibrate(_CONFIG.value, _WORKDIR.value, batches=_BATCHES.value,
                                       seed=_SEED.value)
    except Exception as e:  # noqa: BLE001 - one error line, the traceback above it
        import traceback
        traceback.print_exc()
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    print(calibration.format_report(result), flush=True)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(result, f, indent=1)


def main():
    from absl import app, flags
    from ml_collections import config_flags
    global _CONFIG, _WORKDIR, _BATCHES, _SEED, _JSON
    _CONFIG = config_flags.DEFINE_config_file("config", None, "a run config FILE[:variant]",
                                              lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "where the run's tokenizer / data are built")
    _BATCHES = flags.DEFINE_integer("batches", 2, "iterations' rollouts measured (>= 1)")
    _SEED = flags.DEFINE_integer("seed", 0, "sampling seed of the measured rollouts")
    _JSON = flags.DEFINE_string("json", "", "also write the result to this JSON file")
    argv = sys.argv
    try:
        flags.FLAGS(argv)
    except (flags.Error, ValueError, KeyError, AttributeError) as e:
        print(f"{USAGE}: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    for name, value in (("--config", _CONFIG.value), ("--workdir", _WORKDIR.value)):
        if not value:
            print(f"{USAGE}: {name} is required", file=sys.stderr)
            sys.exit(2)
    if _BATCHES.value < 1:
        print(f"{USAGE}: --batches must be >= 1, got {_BATCHES.value}", file=sys.stderr)
        sys.exit(2)
    from trustrl.training import config_validation as cv
    try:
        cv.validate(_CONFIG.value)
    except ValueError as e:
        print(f"invalid config: {e}", file=sys.stderr)
        sys.exit(2)
    app.run(_main, argv=argv[:1])


if __name__ == "__main__":
    main()
