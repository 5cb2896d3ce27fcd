r"""Runs one command as N jax.distributed processes on this machine (CPU devices), the way a
multi-host job runs: for trying multi-process code and for the tests.

    python -m trustrl.tools.local_cluster --num_processes=2 --devices_per_process=4 -- \
        python -m trustrl.main --multihost --config=configs/default.py:tiny --workdir=/tmp/mp

Each process gets JAX_COORDINATOR_ADDRESS (a free localhost port), JAX_NUM_PROCESSES,
JAX_PROCESS_ID, JAX_PLATFORMS=cpu and XLA_FLAGS with ``devices_per_process`` host devices.
Output lines are prefixed with ``[p<i>]``. When one process fails, the others are killed (a
process waiting in a collective for a dead peer would otherwise wait for jax's timeouts).
SIGTERM / SIGINT are forwarded to every process. Exits with the first non-zero status, else 0.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(i: int, n: int, devices: int, port: int, base=None) -> dict:
    env = dict(os.environ if base is None else base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(n),
               JAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip())
    return env


def run(command: list[str], num_processes: int, devices_per_process: int, *, env=None,
        timeout: float | None = None, out=sys.stdout) -> int:
    """Runs ``command`` as ``num_processes`` processes; returns the exit status (see above)."""
    port = free_port()
    procs = [subprocess.Popen(command, env=process_env(i, num_processes, devices_per_process,
                                                       port, env),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(num_processes)]
    lock = threading.Lock()

    def pump(i, p):
        for line in p.stdout:
            with lock:
                out.write(f"[p{i}] {line}")
                out.flush()

    pumps = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in pumps:
        t.start()
    forward = lambda sig, _frame: [p.send_signal(sig) for p in procs if p.poll() is None]
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    deadline = None if timeout is None else time.monotonic() + timeout
    status = 0
    try:
        while True:
            codes = [p.poll() for p in procs]  # every process polled each round
            if all(c is not None for c in codes):
                break
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            late = deadline is not None and time.monotonic() > deadline
            if failed or late:
                status = failed[0][1] if failed else 124
                why = (f"process {failed[0][0]} exited with status {status}" if failed else
                       f"the timeout of {timeout:g} s passed")
                with lock:
                    out.write(f"local_cluster: {why}; killing the others\n")
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                break
            time.sleep(0.2)
        for p in procs:
            p.wait()
        status = status or next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for t in pumps:
            t.join(timeout=5)
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [--num_processes N] [--devices_per_process D]"
                                           " -- COMMAND ...")
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=None, help="seconds; then all are killed")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be >= 1")
    return run(command, args.num_processes, args.devices_per_process, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
