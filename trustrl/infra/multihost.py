"""Multi-controller helpers: one Python process per host, every process runs the same program.

The rules the loop follows (docs/scaling.md, "Multi-process runs"):
- Every process runs the same host code on the same data in the same order (the prompt
  iterator, the RNG keys and the config are identical), so collectives line up.
- A host read of a global array goes through ``to_host``: it gathers the rows held by other
  processes (a collective: every process calls it) and returns numpy. ``np.asarray`` on an array
  that spans non-addressable devices fails.
- Host data entering a jitted program goes through ``to_global``: each process places only its
  own shards of the (identical) host value.
- Files are written by process 0 (``is_primary``); a file the others read afterwards is written
  under ``primary_first``: process 0 runs the block while the others wait, then they run it and
  find what process 0 wrote (a built dataset, a trained tokenizer, the warm-start cache).

Processes agree or stop (``exchange`` / ``check_agree``, through the coordination service's
key-value store): at start every process publishes a fingerprint of its resolved config, code
version and data, and all stop with one message naming the processes and fields that differ.
During the run a ``PeerWatch`` thread publishes a heartbeat and watches the others': a process
that fails publishes its error line first (``report_failure``), and a process that stops
responding (killed, lost host) is named after ``PEER_TIMEOUT_S``; either way every survivor
prints one line naming the lost process and exits, instead of waiting in a collective for
jax's heartbeat timeout.

With one process every helper reduces to the single-host operation.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P


PEER_TIMEOUT_S = float(os.environ.get("TRUSTRL_PEER_TIMEOUT_S", "60"))
HANDSHAKE_TIMEOUT_S = float(os.environ.get("TRUSTRL_HANDSHAKE_TIMEOUT_S", "120"))


class PeerError(RuntimeError):
    """Another process of the run differs, failed, or does not answer."""


def _client():
    from jax._src import distributed
    client = distributed.global_state.client
    if client is None:
        raise PeerError("jax.distributed is not initialized")
    return client


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def exchange(name: str, value: str, timeout_s: float | None = None) -> list[str]:
    """Every process publishes ``value`` under ``name`` and gets every process's value (index =
    process). ``name`` must be new for each exchange. Raises PeerError naming a process that
    did not publish within ``timeout_s`` or that reported a failure meanwhile."""
    n = jax.process_count()
    if n == 1:
        return [value]
    timeout_s = HANDSHAKE_TIMEOUT_S if timeout_s is None else timeout_s
    client = _client()
    client.key_value_set(f"trustrl/x/{name}/{jax.process_index()}", value)
    out = []
    for i in range(n):
        deadline = time.monotonic() + timeout_s
        while True:  # short waits, so that a peer's failure report ends the wait at once
            try:
                out.append(client.blocking_key_value_get(f"trustrl/x/{name}/{i}", 1000))
                break
            except Exception as e:  # noqa: BLE001 - a timeout, or the coordinator is gone
                failure = _failure(client, i, n)
                if failure is not None:
                    raise PeerError(failure) from None
                if "DEADLINE_EXCEEDED" not in str(e) and "deadline" not in str(e).lower():
                    raise PeerError(f"lost the coordinator ({_address()}) while waiting for "
                                    f"process {i} at '{name}': {_first_line(e)}") from None
                if time.monotonic() > deadline:
                    raise PeerError(f"process {i} of {n} did not reach '{name}' within "
                                    f"{timeout_s:g} s (it failed, hangs, or runs another "
                                    f"program)") from None
    return out


def _try_get(client, key):
    try:
        return client.key_value_try_get(key)
    except Exception:  # noqa: BLE001 - NOT_FOUND
        return None


def _address() -> str:
    from jax._src import distributed
    return f"coordinator {distributed.global_state.coordinator_address}"


def _failure(client, i: int, n: int) -> str | None:
    """Process i's published one-line error (report_failure), as the survivors say it."""
    failure = _try_get(client, f"trustrl/failed/{i}")
    return None if failure is None else f"process {i} of {n} failed: {failure}"


def _lost_coordinator(e: BaseException) -> str:
    return f"lost the {_address()} (process 0 ended or its host was lost): {_first_line(e)}"


def check_agree(name: str, fingerprint: dict):
    """All processes compare ``fingerprint`` (a JSON-able dict of str -> JSON values) with
    process 0's; raises PeerError (the same message on every process) naming each process and
    field that differs. One process: nothing to compare."""
    values = [json.loads(v) for v in exchange(name, json.dumps(fingerprint, sort_keys=True))]
    ref, diffs = values[0], []
    for i, v in enumerate(values[1:], 1):
        fields = sorted(k for k in set(ref) | set(v) if ref.get(k) != v.get(k))
        for k in fields[:4]:
            diffs.append(f"process {i} has {k}={_short(v.get(k))} where process 0 has "
                         f"{_short(ref.get(k))}")
        if len(fields) > 4:
            diffs.append(f"process {i}: {len(fields) - 4} more fields differ")
    if diffs:
        raise PeerError(f"the processes of this run disagree ({name}): " + "; ".join(diffs) +
                        "; start every process with the same command, code and data")


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 80 else text[:77] + "..."


def report_failure(message: str):
    """Publishes this process's one-line error, so the others stop at once and name it."""
    if jax.process_count() == 1:
        return
    try:
        _client().key_value_set(f"trustrl/failed/{jax.process_index()}", message[:500],
                                allow_overwrite=True)
    except Exception:  # noqa: BLE001 - the coordinator may be gone already
        pass


def diagnose_peers(wait_s: float = 6.0) -> str | None:
    """After a collective failed: which process is gone? A published failure, or a heartbeat
    (PeerWatch, every 2 s) that does not move for ``wait_s``; None when every peer looks alive
    (one process: None)."""
    n = jax.process_count()
    if n == 1:
        return None
    me = jax.process_index()
    try:
        client = _client()
        before = {i: _try_get(client, f"trustrl/alive/{i}") for i in range(n) if i != me}
        deadline = time.monotonic() + wait_s
        while True:
            for i in before:
                failure = _failure(client, i, n)
                if failure is not None:
                    return failure
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        still = [i for i in before if _try_get(client, f"trustrl/alive/{i}") == before[i]]
    except Exception as e:  # noqa: BLE001 - the coordination service is gone with process 0
        return _lost_coordinator(e)
    if still:
        return (f"process{'es' if len(still) > 1 else ''} {', '.join(map(str, still))} of {n} "
                f"stopped responding (no heartbeat for {wait_s:g} s: killed, or its host was lost)")
    return None


class PeerWatch:
    """A daemon thread that publishes this process's heartbeat every ``period`` s and exits
    the process (status 1, one line on stderr naming the lost process) when another process
    reported a failure, stopped heart-beating for ``timeout`` s, or the coordinator is gone.
    One process: does nothing."""

    def __init__(self, timeout: float | None = None, period: float = 2.0, exit=os._exit):
        self.timeout = PEER_TIMEOUT_S if timeout is None else timeout
        self.period, self._exit = period, exit
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if jax.process_count() > 1:
            self._thread = threading.Thread(target=self._run, daemon=True, name="trustrl-peers")
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        return False

    def _run(self):
        client, me, n = _client(), jax.process_index(), jax.process_count()
        seen = {i: (None, time.monotonic()) for i in range(n) if i != me}
        beat = 0
        while not self._stop.wait(self.period):
            beat += 1
            try:
                client.key_value_set(f"trustrl/alive/{me}", str(beat), allow_overwrite=True)
                lost = None
                for i in seen:
                    lost = _failure(client, i, n)
                    if lost is not None:
                        break
                    value = _try_get(client, f"trustrl/alive/{i}")
                    if value != seen[i][0]:
                        seen[i] = (value, time.monotonic())
                    elif time.monotonic() - seen[i][1] > self.timeout:
                        lost = (f"process {i} of {n} stopped responding (no heartbeat for "
                                f"{time.monotonic() - seen[i][1]:.0f} s: killed, or its host "
                                f"was lost)")
                        break
            except Exception as e:  # noqa: BLE001 - the coordination service is unreachable
                lost = _lost_coordinator(e)
            if lost and not self._stop.is_set():
                print(f"error: {lost}; stopping this process ({me}) too; rerun the same "
                      f"command to resume from the last checkpoint", file=sys.stderr, flush=True)
                self._exit(1)
                return


def is_primary() -> bool:
    return jax.process_index() == 0


def sync(name: str):
    """A barrier across processes (no-op with one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def primary_first(name: str):
    """Process 0 runs the block first; the others run it after process 0 has finished it (also
    when it raised: they then raise their own error rather than wait for ever)."""
    if jax.process_count() == 1:
        yield
        return
    if is_primary():
        try:
            yield
        finally:
            sync(f"trustrl_primary_first:{name}")
    else:
        sync(f"trustrl_primary_first:{name}")
        yield


_REPLICATE = {}


def _replicate_on(mesh):
    """A jitted identity that replicates its inputs over ``mesh`` (its own devices only)."""
    if mesh not in _REPLICATE:
        _REPLICATE[mesh] = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P()))
    return _REPLICATE[mesh]


def _leaf_to_host(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        if isinstance(x.sharding, NamedSharding):  # gathered on its own mesh's devices: a
            # split layout's other mesh (trustrl.training.async_rollouts) is not involved
            with jax.set_mesh(x.sharding.mesh):  # not the caller's context mesh
                return np.asarray(_replicate_on(x.sharding.mesh)(x).addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def gather_rows(tree, mesh):
    """The numpy leaves of ``tree`` (the same shapes on every process) concatenated along
    their first axis in process order, on every process: an all-gather over one device of
    ``mesh`` per process (a collective: every process calls it, in the same order). With one
    process, ``tree`` as it is."""
    n = jax.process_count()
    if n == 1:
        return tree
    first = {}
    for d in mesh.devices.flat:
        first.setdefault(d.process_index, d)
    if len(first) != n:
        raise ValueError(f"gather_rows: the mesh has devices of {len(first)} of the {n} "
                         f"processes; it needs one of each")
    procs = jax.sharding.Mesh(np.asarray([first[p] for p in sorted(first)]), ("processes",))
    rows = NamedSharding(procs, P("processes"))
    mine = first[jax.process_index()]
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [jax.make_array_from_single_device_arrays(
        (n * np.shape(x)[0], *np.shape(x)[1:]), rows, [jax.device_put(np.asarray(x), mine)])
        for x in leaves]
    with jax.set_mesh(procs):  # not the caller's context mesh
        out = _replicate_on(procs)(arrays)
    return jax.tree.unflatten(treedef, [np.asarray(a.addressable_data(0)) for a in out])


def to_host(tree):
    """numpy copies of a pytree's arrays, gathered across processes where they are sharded over
    other processes' devices (a collective: every process must call it, in the same order)."""
    return jax.tree.map(_leaf_to_host, tree)


def to_global(tree, shardings):
    """Global jax.Arrays from host values that are identical on every process: each process
    places the shards its devices hold. ``shardings``: one Sharding or a matching pytree."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def put(x, s):
        x = np.asarray(x)
        if s.is_fully_addressable:
            return jax.device_put(x, s)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(put, tree, shardings)
