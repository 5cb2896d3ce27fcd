"""Orbax checkpoints of the full training state, with an integrity manifest and fallback.

Saved: the device state pytree (params, optimizer state, step, skipped count) restored straight
into its shardings, plus a small JSON of host state (iteration, data-iterator position and
shuffle seed, the RNG key data, anything else the loop needs to continue bit-for-bit). Saves are
atomic (Orbax writes to a temporary directory and renames), so an interrupted save never
corrupts the latest good checkpoint.

Integrity: Orbax / TensorStore checksum only parts of a step (OCDBT b-tree nodes carry CRC-32C;
array bytes and the JSON files do not), so a flipped byte in array data restores silently. After
a save has finished, process 0 writes ``<step>/trustrl_manifest.json`` (atomically): the size and
sha256 of every file of the step (on a bucket, the crc32c the store keeps per object instead).
``restore`` checks it first: every listed file must exist with its size and hash (extra files
are ignored). A damaged latest step is reported (which step, which
file, why) and the previous intact step is restored instead; the damaged steps are moved to
``<workdir>/checkpoints_damaged/`` so the resumed run can save those steps again. A step without
a manifest (saved by an older trustrl, or killed between Orbax's commit and the manifest write)
is restored unverified, with a printed warning.
"""
from __future__ import annotations

import json
import re
import jax
import orbax.checkpoint as ocp

from trustrl.infra import integrity, sharding, storage

MANIFEST = "trustrl_manifest.json"


class CheckpointError(RuntimeError):
    """No intact checkpoint could be restored."""


def _sha256(path: str) -> str:
    return integrity.file_digest(path)["sha256"]


def _step_files(step_dir: str) -> dict[str, int]:
    """{relative path: size} of the files of a step, the manifest left out."""
    return {rel: n for rel, n in sorted(storage.files(step_dir).items()) if rel != MANIFEST}


def write_manifest(step_dir: str):
    """Records size and sha256 of every file under step_dir in step_dir/trustrl_manifest.json;
    on object storage that keeps a checksum per object (GCS: crc32c), that checksum instead of
    a sha256 (a listing instead of downloading the whole checkpoint again)."""
    stored = storage.stored_checksums(step_dir)
    files = {rel: ({"size": n, "crc32c": stored[rel]} if stored else
                   {"size": n, "sha256": _sha256(storage.join(step_dir, rel))})
             for rel, n in _step_files(step_dir).items()}
    storage.write(storage.join(step_dir, MANIFEST),
                  json.dumps({"version": 1, "files": files}, indent=1, sort_keys=True))


def verify_manifest(step_dir: str) -> bool:
    """True if the step matches its manifest, False if it has none; raises CheckpointError
    naming the first missing, resized or changed file."""
    path = storage.join(step_dir, MANIFEST)
    if not storage.exists(path):
        return False
    try:
        files = json.loads(storage.read_text(path))["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e})") from e
    present = storage.files(step_dir)
    stored = None
    if any("crc32c" in want for want in files.values()):
        stored = storage.stored_checksums(step_dir) or {}
    for rel, want in sorted(files.items()):
        full = storage.join(step_dir, rel)
        if rel not in present:
            raise CheckpointError(f"{full} is missing")
        if present[rel] != want["size"]:
            raise CheckpointError(f"{full} has {present[rel]} bytes, {want['size']} when saved "
                                  f"(truncated or overwritten)")
        if "crc32c" in want:
            if stored.get(rel) != want["crc32c"]:
                raise CheckpointError(f"{full} changed since it was saved (crc32c mismatch: "
                                      f"{stored.get(rel)} != {want['crc32c']})")
        elif _sha256(full) != want["sha256"]:
            raise CheckpointError(f"{full} changed since it was saved (sha256 mismatch)")
    return True


def _cause(e: BaseException) -> str:
    """The innermost exception of a chain, without TensorStore's multi-kB spec dumps."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    text = re.sub(r" \[source locations='[^']*'\]", "", str(e).split(" [tensorstore_spec", 1)[0])
    if len(text) > 600:  # the reason ends the message (": Read-only file system"): keep both ends
        text = f"{text[:300]} ... {text[-300:]}"
    return f"{type(e).__name__}: {text}"


# bytes of the arrays of a pytree (global shapes), i.e. about one checkpoint's size
state_nbytes = sharding.nbytes


class Checkpointer:
    def __init__(self, workdir: str, max_to_keep: int = 2):
        self.workdir = workdir
        self.directory = storage.join(storage.absolute(workdir), "checkpoints")
        self.damaged_directory = storage.join(storage.absolute(workdir), "checkpoints_damaged")
        self.max_to_keep = max_to_keep
        self._writes = jax.process_index() == 0
        self._unmanifested = []  # steps saved asynchronously, manifest written once finished
        self.manager = self._make_manager()

    def _make_manager(self):
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True))

    def latest_step(self):
        return self.manager.latest_step()

    def step_dir(self, step: int) -> str:
        return storage.join(self.directory, str(step))

    def check_space(self, state):
        """Raises StorageError unless the disk can hold the checkpoints still to come: one copy
        of the state per step that max_to_keep will keep beyond the existing ones, at least one
        (the newest is written before the oldest is deleted)."""
        copies = max(1, self.max_to_keep - len(self.manager.all_steps()))
        storage.check_free_space(self.directory, copies * state_nbytes(state),
                                 f"{copies} checkpoint(s) of {state_nbytes(state) / 2**20:.1f} MiB")

    def save(self, step: int, state, host_state: dict, *, wait: bool = True):
        self._finish_pending()
        storage.check_free_space(self.directory, state_nbytes(state), f"checkpoint {step}")
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host_state)))
        except Exception as e:  # noqa: BLE001 - re-raised with the step, directory and cause
            raise self._save_error(e, [step]) from e
        self._unmanifested.append(step)
        if wait:
            self._finish_pending()

    def _finish_pending(self):
        """Waits for running saves, then writes the manifests of the steps they committed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - async save errors surface here, re-raised clearly
            steps, self._unmanifested = self._unmanifested, []
            raise self._save_error(e, steps) from e
        pending, self._unmanifested = self._unmanifested, []
        if self._writes:
            for step in pending:
                if storage.isdir(self.step_dir(step)):  # max_to_keep may have removed it already
                    write_manifest(self.step_dir(step))

    def _save_error(self, e: Exception, steps) -> Exception:
        """StorageError for a filesystem error (with the free space), else CheckpointError."""
        what = f"save checkpoint {', '.join(map(str, steps))} to"
        if isinstance(e, OSError):
            return storage.storage_error(e, self.directory, what)
        return CheckpointError(f"cannot {what} {self.directory}: {_cause(e)}")

    def restore(self, abstract_state, step: int | None = None):
        """Restores (state, host_state). ``abstract_state``: a pytree of ShapeDtypeStruct with
        shardings (e.g. jax.eval_shape of the init, with .sharding set) or concrete arrays.

        step=None: the latest intact step (see the module docstring for the fallback); a given
        step is restored or fails, without fallback. Raises CheckpointError naming the directory
        and the reason of each step tried when none could be restored."""
        self._finish_pending()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        steps = sorted(self.manager.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        failed = []
        for s in steps:
            try:
                out = self._restore_step(s, abstract)
            except Exception as e:  # noqa: BLE001 - reported, and the previous step is tried
                why = str(e) if isinstance(e, CheckpointError) else _cause(e)
                print(f"checkpoint: step {s} in {self.directory} cannot be restored: {why}",
                      flush=True)
                failed.append((s, why))
                try:  # a failed restore can leave Orbax's executor unusable: start afresh
                    self.manager.close()
                except Exception:  # noqa: BLE001 - the broken manager is dropped either way
                    pass
                self.manager = self._make_manager()
                continue
            if failed:
                print(f"checkpoint: fell back to step {s}, the latest intact one", flush=True)
                self._quarantine([f for f, _ in failed])
            return out
        raise CheckpointError(f"no intact checkpoint in {self.directory}: " + "; ".join(
            f"step {s}: {why}" for s, why in failed))

    def _restore_step(self, step, abstract):
        if not storage.isdir(self.step_dir(step)):
            raise CheckpointError(f"{self.step_dir(step)} does not exist")
        if not verify_manifest(self.step_dir(step)):
            print(f"checkpoint: step {step} has no {MANIFEST}; restoring it unverified",
                  flush=True)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()))
        if not isinstance(out.host, dict):
            raise CheckpointError(f"host state of step {step} is {type(out.host).__name__}, "
                                  f"not a JSON object")
        return out.state, out.host

    def _quarantine(self, steps):
        """Moves damaged steps out of the way (kept for inspection), so they can be saved anew."""
        if self._writes:
            storage.makedirs(self.damaged_directory)
            for s in steps:
                dest = storage.join(self.damaged_directory, str(s))
                n = 1
                while storage.exists(dest):
                    dest, n = storage.join(self.damaged_directory, f"{s}.{n}"), n + 1
                storage.move_tree(self.step_dir(s), dest)
                print(f"checkpoint: moved damaged step {s} to {dest}", flush=True)
        ocp.multihost.sync_global_processes("trustrl_checkpoint_quarantine")
        self.manager.reload()

    def close(self):
        """Finishes the pending saves, then closes Orbax's manager (its background deletions and
        finalisation). The first failure is raised, naming the directory."""
        first = None
        try:
            self._finish_pending()
        except Exception as e:  # noqa: BLE001 - raised below, after the manager is closed
            first = e
        try:
            self.manager.close()
        except Exception as e:  # noqa: BLE001 - Orbax's thread errors, re-raised clearly
            if first is None:
                first = (storage.storage_error(e, self.directory, "finish the checkpoints in")
                         if isinstance(e, OSError) else
                         CheckpointError(f"cannot finish the checkpoints in {self.directory}: "
                                         f"{_cause(e)}"))
                first.__cause__ = e
        if first is not None:
            raise first
