"""Command line: ``python -m trustrl.main --config=configs/default.py[:variant] --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.loss.method=dppo_binary_kl``. The config is
locked (a typo in a field name fails) and checked before anything is written: every bad flag,
field or value exits with status 2 and one ``invalid config: ...`` (or ``usage: ...``) line, and
the workdir is not created. Rerunning in a workdir with checkpoints resumes it, only with the
config it recorded (``DIR/config.json``), up to operational fields and a longer
``train.iterations``; ``--allow_config_change`` continues with other changes, listing them.
SIGTERM (preemption, maintenance) stops the run after the iteration in flight, with a
checkpoint, and exits with status 143; rerunning the same command resumes it.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

USAGE = ("usage: python -m trustrl.main --config=FILE[:VARIANT] --workdir=DIR "
         "[--config.FIELD=VALUE ...] [--allow_config_change] "
         "[--multihost [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]]")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumed if it has checkpoints).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first "
                               "(TPU pods / multi-host GPU; see launch/tpu_pod.sh).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "With --multihost: host:port of process 0's coordinator "
    "(default: JAX_COORDINATOR_ADDRESS, or detected on TPU / Slurm / Open MPI).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "With --multihost: the number of processes (default: "
    "JAX_NUM_PROCESSES, or detected).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "With --multihost: this process's id in [0, num_processes) (default: "
    "JAX_PROCESS_ID, or detected).")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir although fields that change the run's "
    "semantics differ from its recorded config.json (the changes are printed and logged).")


def _fail(message: str):
    print(message, file=sys.stderr)
    sys.exit(2)


def _config_spec(argv):
    """The value of --config in argv, or None."""
    for i, arg in enumerate(argv):
        m = re.fullmatch(r"--?config(?:=(.*))?", arg)
        if m:
            return m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv)
                                                              else None)
    return None


def _load_config(spec: str):
    """Loads FILE[:ARG] as config_flags does, raising ValueError with a one-line message."""
    path, sep, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"--config: config file {path!r} not found")
    try:
        module_spec = importlib.util.spec_from_file_location("trustrl_cli_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(*([arg] if sep else []))
    except Exception as e:  # noqa: BLE001  (any failure of user config code is reported)
        what = "" if isinstance(e, ValueError) else f"{type(e).__name__}: "
        raise ValueError(f"--config={spec}: {what}{e}") from None


_PARSERS = {int: flags.IntegerParser(), float: flags.FloatParser(),
            bool: flags.BooleanParser()}


def describe_parse_error(argv, error) -> str:
    """One line naming what in argv made flag parsing fail (the config file or variant, the
    unknown field with the valid ones, or the field whose value has the wrong type)."""
    spec = _config_spec(argv)
    if spec is None:
        return f"{USAGE}: --config is required"
    try:
        cfg = _load_config(spec)
    except ValueError as e:
        return f"invalid config: {e}"
    for arg in argv[1:]:
        m = re.fullmatch(r"--?(no)?config\.([^=]+)(?:=(.*))?", arg)
        if not m:
            continue
        negated, field, value = m.groups()
        node, walked = cfg, "config"
        for part in field.split("."):
            if not isinstance(node, ConfigDict) or part not in node:
                fields = sorted(node.keys()) if isinstance(node, ConfigDict) else []
                close = difflib.get_close_matches(part, fields, n=1)
                hint = f" (did you mean {walked}.{close[0]}?)" if close else ""
                valid = (f"; fields of {walked}: {', '.join(fields)}" if fields else
                         f" ({walked} is a value of type {type(node).__name__}, not a group)")
                return f"invalid config: unknown field config.{field}{hint}{valid}"
            node, walked = node[part], f"{walked}.{part}"
        kind = type(node)
        if value is not None and kind in _PARSERS and not negated:
            try:
                _PARSERS[kind].parse(value)
            except (TypeError, ValueError):
                return (f"invalid config: config.{field} must be {'an' if kind is int else 'a'} "
                        f"{kind.__name__}, got {value!r}")
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, flags.UnrecognizedFlagError):
        return f"{USAGE}: {message}"
    return f"invalid config: {message}"


def _parse_flags(argv):
    """absl flag parsing whose every failure exits 2 with one line, no traceback."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        _fail(describe_parse_error(argv, e))


def distributed_kwargs(multihost: bool, coordinator, num_processes, process_id,
                       environ=os.environ) -> dict | None:
    """jax.distributed.initialize's arguments from the flags, else the standard environment
    variables; None without --multihost. Raises ValueError naming what is missing or wrong."""
    given = {"coordinator_address": coordinator, "num_processes": num_processes,
             "process_id": process_id}
    if not multihost:
        extra = sorted(k for k, v in given.items() if v is not None)
        if extra:
            raise ValueError(f"--{', --'.join(extra)} only apply with --multihost")
        return None
    env = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
           "process_id": "JAX_PROCESS_ID"}
    kwargs = {}
    for k, v in given.items():
        if v is None and environ.get(env[k]):
            v = environ[env[k]]
            if k != "coordinator_address":
                try:
                    v = int(v)
                except ValueError:
                    raise ValueError(f"{env[k]}={environ[env[k]]!r} is not an int") from None
        if v is not None:
            kwargs[k] = v
    explicit = {"num_processes", "process_id"} & set(kwargs)
    if explicit and len(kwargs) < 3:  # a partial explicit set would be half auto-detected
        missing = sorted(set(env) - set(kwargs))
        raise ValueError(f"--multihost with {sorted(explicit)} also needs "
                         f"{', '.join('--' + m + ' (or ' + env[m] + ')' for m in missing)}")
    if "num_processes" in kwargs:
        n, i = kwargs["num_processes"], kwargs["process_id"]
        if n < 1 or not 0 <= i < n:
            raise ValueError(f"--process_id={i} must be in [0, --num_processes={n}) and "
                             f"num_processes >= 1")
    if "coordinator_address" in kwargs and not re.fullmatch(r"\S+:\d+",
                                                             kwargs["coordinator_address"]):
        raise ValueError(f"--coordinator_address={kwargs['coordinator_address']!r} must be "
                         f"host:port")
    return kwargs


def main(argv):
    if len(argv) > 1:
        _fail(f"{USAGE}: unexpected arguments {argv[1:]}")
    cfg, wd = _CONFIG.value, _WORKDIR.value
    if not isinstance(cfg, ConfigDict):  # config_flags defers a missing file's error
        _fail(describe_parse_error(sys.argv, ValueError("--config did not load a ConfigDict")))
    if not wd:
        _fail(f"{USAGE}: --workdir is required")
    logging.set_verbosity(logging.WARNING)  # Orbax / tfds INFO lines drown the progress bar
    try:
        dist = distributed_kwargs(_MULTIHOST.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value)
    except ValueError as e:
        _fail(f"{USAGE}: {e}")
    if dist is not None:
        import jax
        jax.distributed.initialize(**dist)  # before check_environment counts the devices
    from trustrl import config_validation as cv
    try:
        cv.validate(cfg)
        cv.check_environment(cfg, wd)
        notices, changes, step = cv.check_resume(cfg, wd, allow_changes=_ALLOW_CHANGE.value)
    except ValueError as e:
        _fail(f"invalid config: {e}")
    for line in notices:
        print(line)
    import jax
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
    from trustrl import train
    from trustrl import multihost
    from trustrl import storage
    if multihost.is_primary():
        storage.makedirs(wd)
        cv.record_config(cfg, wd, changes, step)
    multihost.sync("trustrl_config_recorded")  # every process has checked it first
    from trustrl.checkpoint import CheckpointError
    from trustrl.durable import StorageError
    from trustrl.preemption import EXIT_CODE, Preempted
    try:
        train.train(cfg, wd)
    except (StorageError, CheckpointError) as e:  # already one clear line naming the path
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Preempted as e:  # checkpointed at an iteration boundary; a rerun resumes
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(EXIT_CODE)
    except BaseException:
        if jax.process_count() > 1:
            # a normal exit would wait in jax's shutdown barrier for the other processes, which
            # wait in a collective for this one; leaving at once lets the coordination service
            # report this process as failed and end the others (after its heartbeat timeout)
            import traceback
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        raise
    if not multihost.is_primary():  # process 0 writes the plots and prints the summary
        return
    from trustrl import metrics, plot, summary
    rows = metrics.read_jsonl(storage.join(wd, "metrics.jsonl"))
    plot.plot_runs([wd], storage.join(wd, "plots"))
    summary.print_summary(rows)
    print(f"metrics: {wd}/metrics.jsonl  tensorboard: {wd}/tb  plots: {wd}/plots/*.png")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
