r"""Runs a config's sweep as local processes: one ``python -m trustrl.main`` per run.

    python launch/sweep.py --config=configs/methods.py --workdir=workdirs/methods \
        [--parallel=2] [--variant=tiny] [--dry_run] [-- --config.train.iterations=30 ...]

The config file defines ``get_sweep(arg) -> [{"config_arg": str, <field>: value, ...}]``; each
entry becomes ``--config=FILE:config_arg[,variant]`` plus ``--config.<field>=value`` overrides, in
``WORKDIR/<config_arg>[_<field><value>...]``. Arguments after ``--`` go to every run. A run whose
workdir already has a finished checkpoint resumes (and exits at once when complete), so re-running
a sweep only does what is missing. Pods: launch/tpu_pod.sh runs one config on every worker.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time


def load_sweep(config_path: str, arg: str | None = None) -> list[dict]:
    spec = importlib.util.spec_from_file_location("sweep_config", config_path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.getcwd())
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise SystemExit(f"{config_path} defines no get_sweep(); nothing to sweep")
    return module.get_sweep(arg)


def run_name(entry: dict) -> str:
    extra = "".join(f"_{k.split('.')[-1]}{v}" for k, v in entry.items() if k != "config_arg")
    return f"{entry.get('config_arg', 'run')}{extra}"


def commands(config_path, entries, workdir, variant="", passthrough=()):
    out = []
    for e in entries:
        arg = e.get("config_arg", "")
        if variant:
            arg = f"{arg},{variant}" if arg else variant
        cmd = [sys.executable, "-m", "trustrl.main", f"--config={config_path}:{arg}" if arg
               else f"--config={config_path}", f"--workdir={os.path.join(workdir, run_name(e))}"]
        cmd += [f"--config.{k}={v}" for k, v in e.items() if k != "config_arg"]
        out.append(cmd + list(passthrough))
    return out


def split_passthrough(argv):
    """(own arguments, arguments after "--" that are passed on to every run)."""
    if "--" not in argv:
        return list(argv), []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def main(argv=None):
    argv, passthrough = split_passthrough(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="config file with get_sweep()")
    p.add_argument("--workdir", required=True, help="root directory of the runs")
    p.add_argument("--variant", default="", help="appended to every config arg (e.g. tiny)")
    p.add_argument("--parallel", type=int, default=1, help="runs at once")
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)
    if args.parallel < 1:
        raise SystemExit(f"--parallel must be >= 1, got {args.parallel}")
    cmds = commands(args.config, load_sweep(args.config), args.workdir, args.variant, passthrough)
    if args.dry_run:
        for c in cmds:
            print(" ".join(c))
        return 0
    os.makedirs(args.workdir, exist_ok=True)
    failed = run_commands(cmds, args.parallel)
    if failed:
        print(f"{len(failed)} run(s) failed; see their log.txt: {failed}")
        return 1
    return 0


def run_commands(cmds, parallel: int = 1) -> list[str]:
    """Runs trustrl.main commands, ``parallel`` at a time, each logging to WORKDIR/log.txt.
    Returns the workdirs of the runs that failed."""
    pending, running, failed = list(cmds), [], []
    while pending or running:
        while pending and len(running) < parallel:
            cmd = pending.pop(0)
            wd = next(c for c in cmd if c.startswith("--workdir=")).split("=", 1)[1]
            os.makedirs(wd, exist_ok=True)
            log = open(os.path.join(wd, "log.txt"), "a")
            print(f"start {wd}", flush=True)
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), wd, log))
        time.sleep(1)
        for item in list(running):
            proc, wd, log = item
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                print(f"{'done' if proc.returncode == 0 else 'FAILED'} {wd} (rc {proc.returncode})",
                      flush=True)
                if proc.returncode:
                    failed.append(wd)
    return failed


if __name__ == "__main__":
    sys.exit(main())
