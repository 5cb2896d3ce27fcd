"""Command line: ``python -m trustrl.main --config=configs/default.py[:variant] --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.loss.method=dppo_binary_kl``. The config is
locked (a typo in a field name fails) and checked before anything is written: every bad flag,
field or value exits with status 2 and one ``invalid config: ...`` (or ``usage: ...``) line, and
the workdir is not created. Rerunning in a workdir with checkpoints resumes it, only with the
config it recorded (``DIR/config.json``), up to operational fields and a longer
``train.iterations``; ``--allow_config_change`` continues with other changes, listing them.
SIGTERM (preemption, maintenance) or SIGINT stops the run after the iteration in flight, with a
checkpoint, and exits with status 143 (130); rerunning the same command resumes it. One run per
workdir (trustrl.infra.workdir_lock); with --multihost the processes check that they agree on
config,
code and data, and a failed or lost process is named by the others (trustrl.infra.multihost). Every
failure ends with one ``error: ...`` line, last on stderr (docs/reliability.md).
"""
from __future__ import annotations

import difflib
import errno
import importlib.util
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

USAGE = ("usage: python -m trustrl.main --config=FILE[:VARIANT] --workdir=DIR "
         "[--config.FIELD=VALUE ...] [--allow_config_change] "
         "[--multihost [--coordinator_address=HOST:PORT --num_processes=N --process_id=I] "
         "[--coordinator_timeout=SECONDS]]")

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
_COORDINATOR_TIMEOUT = flags.DEFINE_integer(
    "coordinator_timeout", 60, "With --multihost: seconds a process waits to join the "
    "coordinator before it stops with an error naming the address.")
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
    except Exception as e:  # noqa: BLE001 - a config file's own errors (SyntaxError, ...) too
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


def initialize_distributed(dist: dict, timeout_s: int):
    """jax.distributed.initialize, failing within seconds with one line naming the address:
    process 0 first checks that it can bind the coordinator's port (a port in use made the
    service crash); the others wait at most ``timeout_s`` for the coordinator."""
    import jax
    address = dist.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address and dist.get("process_id") == 0:
        host, _, port = address.rpartition(":")
        import socket
        with socket.socket() as s:
            try:
                s.bind(("" if host in ("localhost", "127.0.0.1", "0.0.0.0") else host, int(port)))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    _fail(f"error: the coordinator address {address} is in use on this host "
                          f"(another run or program holds port {port}); pick another port in "
                          f"--coordinator_address / JAX_COORDINATOR_ADDRESS for every process")
                # another host's name (its address is not local): jax binds to all interfaces
    where = address or "(auto-detected)"
    why = (f"error: the processes of this run did not all join the coordinator at {where} "
           f"within {timeout_s} s (--coordinator_timeout): one has not started, failed before "
           f"joining (see its output), or uses another address / --num_processes")
    # jax's own timeout ends the process with a C++ abort and a stack dump; this timer ends
    # it first with one line (connect releases the GIL while it waits)
    import threading
    timer = threading.Timer(timeout_s, lambda: (print(why, file=sys.stderr, flush=True),
                                                os._exit(2)))
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(**dist, initialization_timeout=timeout_s + 60)
    except Exception as e:  # noqa: BLE001 - XlaRuntimeError / RuntimeError / ValueError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        _fail(f"error: cannot join the run's coordinator at {where}: {type(e).__name__}: "
              f"{first}")
    finally:
        timer.cancel()


def fingerprint(cfg, wd: str) -> dict:
    """What every process of a run must agree on: the resolved config (every field), the
    workdir, the trustrl code (a hash of its sources) and the jax version."""
    import hashlib

    import jax
    from trustrl.training import resume
    root = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for d, dirs, names in sorted(os.walk(root)):
        dirs.sort()
        for n in sorted(names):
            if n.endswith(".py"):
                h.update(os.path.relpath(os.path.join(d, n), root).encode())
                with open(os.path.join(d, n), "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
    out = {f"config.{k}": v for k, v in resume.flatten(cfg).items()}
    out.update({"workdir": wd, "trustrl code (sha256 of trustrl/**/*.py)": h.hexdigest()[:16],
                "jax version": jax.__version__, "--allow_config_change": _ALLOW_CHANGE.value})
    return out


def quiet_library_tracebacks():
    """Log records of Orbax / TensorStore background threads (and of asyncio, which logs their
    tasks' unretrieved exceptions) keep their message (first line) but lose their traceback: a
    failed save logs the same error from ~5 threads with ~100-line tracebacks each, burying the
    run's own one-line error (which names the step, directory and cause). The records still say
    what failed, and where."""
    import logging as std_logging

    def one_line(record):
        if any(f"/{lib}/" in record.pathname for lib in ("orbax", "tensorstore", "asyncio")):
            if record.exc_info or record.exc_text:
                record.exc_info, record.exc_text = None, None
            message = record.getMessage().splitlines()
            record.msg, record.args = (message[0][:400] if message else ""), None
        return True

    for handler in std_logging.getLogger().handlers:
        handler.addFilter(one_line)

    # TensorStore's completion callbacks of a failed restore land on Orbax's event loop after it
    # closed; C++ prints each one through sys.excepthook (a dozen identical tracebacks)
    previous, previous_unraisable = sys.excepthook, sys.unraisablehook

    def closed_loop(value) -> bool:
        return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"

    def excepthook(kind, value, tb):
        if not closed_loop(value):
            previous(kind, value, tb)

    def unraisablehook(info):
        if closed_loop(info.exc_value):
            return
        tb, files = info.exc_traceback, []
        while tb is not None:
            files.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
        if any("/orbax/" in f or "/tensorstore/" in f for f in files):  # a failed save / restore
            first = (str(info.exc_value).strip().splitlines() or [""])[0][:300]
            print(f"(ignored in Orbax: {type(info.exc_value).__name__}: {first})",
                  file=sys.stderr, flush=True)
            return
        previous_unraisable(info)

    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def _last_line(line: str):
    """The run's one error line, written to the stderr descriptor in one write: library
    threads still printing through sys.stderr cannot interleave with it or break it."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a stream another thread broke; the line still goes out
        pass
    os.write(2, ("\n" + line.replace("\n", " ") + "\n").encode("utf-8", "replace"))


def _exit_now(code: int):
    """Exits at once after the run's last line: library threads still failing (TensorStore
    callbacks on Orbax's closed event loop) cannot print after it, and none is waited for."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os._exit(code)


def _error_line(e: BaseException) -> str:
    text = str(e)
    if isinstance(e, OSError) and e.strerror:  # no "[Errno 30]", but the file when known
        text = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    lines = text.strip().splitlines()
    return lines[0] if lines else type(e).__name__


def main(argv):
    if len(argv) > 1:
        _fail(f"{USAGE}: unexpected arguments {argv[1:]}")
    cfg, wd = _CONFIG.value, _WORKDIR.value
    if not isinstance(cfg, ConfigDict):  # config_flags defers a missing file's error
        _fail(describe_parse_error(sys.argv, ValueError("--config did not load a ConfigDict")))
    if not wd:
        _fail(f"{USAGE}: --workdir is required")
    logging.set_verbosity(logging.WARNING)  # Orbax / tfds INFO lines drown the progress bar
    quiet_library_tracebacks()
    try:
        dist = distributed_kwargs(_MULTIHOST.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value)
    except ValueError as e:
        _fail(f"{USAGE}: {e}")
    from trustrl.training import config_validation as cv, resume
    try:
        cv.validate(cfg)  # the config alone, before joining the other processes
    except ValueError as e:
        _fail(f"invalid config: {e}")
    if dist is not None:  # before check_environment counts the devices
        initialize_distributed(dist, _COORDINATOR_TIMEOUT.value)
    from trustrl.infra import multihost
    from trustrl.infra.multihost import PeerError
    if dist is not None:  # every process has the same config, code and workdir, or all stop
        try:
            multihost.check_agree("start", fingerprint(cfg, wd))
        except PeerError as e:
            _fail(f"error: {e}")
    try:
        cv.check_environment(cfg, wd)
        resume.check_resume(cfg, wd, allow_changes=_ALLOW_CHANGE.value)  # printed by train
    except ValueError as e:
        multihost.report_failure(f"invalid config: {e}")
        _fail(f"invalid config: {e}")
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
    from trustrl.infra import storage
    from trustrl.training import loop as train
    from trustrl.infra.checkpoint import CheckpointError
    from trustrl.infra.storage import StorageError
    from trustrl.infra.integrity import IntegrityError
    from trustrl.infra.preemption import Preempted
    from trustrl.infra.workdir_lock import WorkdirLocked
    try:
        train.train(cfg, wd, allow_config_change=_ALLOW_CHANGE.value)
    except Preempted as e:  # checkpointed at an iteration boundary; a rerun resumes
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except BaseException as e:
        if isinstance(e, SystemExit):
            raise
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C before the loop (build, compile)
            _last_line("interrupted (SIGINT) before the first iteration finished; nothing of "
                       "this start was checkpointed; rerun the same command to start again")
            multihost.report_failure("interrupted (SIGINT)")
            _exit_now(130)
        known = isinstance(e, (StorageError, CheckpointError, IntegrityError, WorkdirLocked,
                               PeerError, ValueError))
        kind = "invalid config" if type(e) is ValueError else "error"
        line = f"{kind}: {_error_line(e)}" if known else f"error: {type(e).__name__}: " \
            f"{_error_line(e)}"
        lost = None if known else multihost.diagnose_peers()  # a collective failed: whose fault?
        if lost:
            known, line = True, f"error: {lost}; here: {line[len('error: '):]}"[:1000]
        if not known:  # a bug or an unforeseen failure: its traceback, then the one line
            import traceback
            traceback.print_exc()
        _last_line(line)
        multihost.report_failure(line)  # the others stop at once, naming this process
        # os._exit, not sys.exit: a normal exit would join the library threads a failure left
        # waiting (Orbax's save threads wait 300 s for signals that never come) and, with
        # several processes, wait in jax's shutdown barrier for peers stuck in a collective
        _exit_now(2 if kind == "invalid config" else 1)
    if not multihost.is_primary():  # process 0 writes the plots and prints the summary
        return
    from trustrl.infra import metrics
    from trustrl.analysis import plot, summary
    rows = metrics.read_jsonl(storage.join(wd, "metrics.jsonl"))
    plot.plot_runs([wd], storage.join(wd, "plots"))
    summary.print_summary(rows)
    print(f"metrics: {wd}/metrics.jsonl  tensorboard: {wd}/tb  plots: {wd}/plots/*.png")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
