"""Checkpoints of the whole daemon state, and the restart that resumes from them.

    STATE/checkpoints/<stream offset covered, 20 digits>.ckpt    the newest two are kept

A checkpoint file is `EDGECLC2`, the payload length (u64 little-endian), the payload's sha256,
then the payload: a `torch.save` of

    {format, covered, created, learner: OnlineLearner.state_dict(), dedup: SeenSequences state,
     counters: {...}, parts: {"heldout": ...}, snapshot_version}

Loading can never run code: the payload is read with `torch.load(weights_only=True)`, whose
unpickler builds only tensors and plain containers and refuses every other global (a planted
`os.system` is a one-line refusal, see read_checkpoint). So that this holds, `encode` lets in
only the types in SAFE_TYPES, and turns numpy arrays and scalars into tagged tensors or bytes
(`to_safe`), which `read_checkpoint` turns back (`from_safe`). Anything else is refused at save
time with the path of the offending value. Files from before (`EDGECLC1`, numpy pickled as
such) still load: with weights_only=True and numpy's array and dtype reconstructors allowed
(LEGACY_GLOBALS), nothing more.

`covered` is the stream offset up to which every accepted push has been learned (or offered to
the buffer, held out, or failed) in this state: the learner consumes pushes in offset order,
and a checkpoint is only taken between pushes. Restart = newest checkpoint that reads back whole + the journal records
from `covered` on. So a sample learned after the checkpoint is learned again from the
checkpoint's state, which never saw it: exactly once. The dedup state saved is the learner
thread's own record of the pushes it consumed, so it matches `covered` exactly.

Who does what: the learner thread writes checkpoints (it owns torch and the learner). A
restart has two halves: `restore_offsets` reads the journal in `Daemon.__init__` (no torch,
so acks start within a second of launch), and `restore_learner` loads the checkpoint in the
learner thread, while the socket loop already serves. Writes are atomic (temporary
file, fsync, rename, fsync of the directory). Journal segments are removed once the *older*
of the two kept checkpoints covers them, so falling back to it never misses a record.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import struct
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable

from edgecl.errors import UserError
from edgecl.files import TMP_PREFIX, write_atomic
from edgecl.serve.journal import DurableCounter, Journal
from edgecl.serve.learning import HasSettings
from edgecl.serve.queue import Batch, SeenSequences, joins_group

log = logging.getLogger("edgecl.checkpoints")

MAGIC = b"EDGECLC2"
LEGACY_MAGIC = b"EDGECLC1"          # numpy arrays pickled as numpy objects (edgecl <= 0.x)
HEAD = struct.Struct("<8sQ32s")     # magic, payload bytes, sha256 of the payload
SUFFIX = ".ckpt"
KEEP = 2
FORMAT = 2
LEGACY_FORMAT = 1
LOCK_FILE = "LOCK"
DUPLICATES_FILE = "samples_duplicate"
OFFER_GROUP = 1024                  # samples per offer_many call when a replay offers pushes


class CheckpointDamaged(Exception):
    """A checkpoint file that does not read back whole."""


class CheckpointRefused(CheckpointDamaged):
    """A checkpoint that reads back whole but holds something other than plain data: a
    planted pickle. Never loaded; an older checkpoint is tried instead."""


def encode(state: dict) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(to_safe(state), buf)
    payload = buf.getvalue()
    return HEAD.pack(MAGIC, len(payload), hashlib.sha256(payload).digest()) + payload


def read_checkpoint(path: Path) -> dict:
    """The state in `path`; CheckpointDamaged if it is short, altered or unreadable, and
    CheckpointRefused if it holds anything but tensors and plain data (a planted pickle)."""
    data = Path(path).read_bytes()
    if len(data) < HEAD.size:
        raise CheckpointDamaged(f"{len(data)} bytes, shorter than the header")
    magic, length, digest = HEAD.unpack_from(data)
    if magic not in (MAGIC, LEGACY_MAGIC):
        raise CheckpointDamaged("not an edgecl checkpoint (bad magic)")
    payload = memoryview(data)[HEAD.size:]
    if len(payload) != length:
        raise CheckpointDamaged(f"payload is {len(payload)} bytes, header says {length}")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointDamaged("sha256 mismatch")
    state = from_safe(_load_weights_only(payload, legacy=magic == LEGACY_MAGIC))
    expected = FORMAT if magic == MAGIC else LEGACY_FORMAT
    if not isinstance(state, dict) or state.get("format") != expected:
        raise CheckpointDamaged(f"unknown checkpoint format {_format_of(state)!r}")
    return state


def _load_weights_only(payload, legacy: bool):
    """torch.load that builds tensors and plain containers only; a legacy file may also
    hold numpy arrays, dtypes and scalars. Never falls back to full pickle."""
    import pickle

    import torch

    try:
        if legacy:
            with torch.serialization.safe_globals(_legacy_globals()):
                return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointRefused(f"refused to load: {_unsafe_reason(exc)}; a checkpoint holds "
                                "only tensors and plain data, so this file was planted or "
                                "written by something else") from None
    except Exception as exc:  # a payload that hashes right but does not unpickle
        raise CheckpointDamaged(f"unreadable payload ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def _unsafe_reason(exc: Exception) -> str:
    """torch's multi-paragraph refusal, cut to the line that names the global."""
    for line in str(exc).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip()[:200]
    return "it holds a Python object that is not allowed"


def _format_of(state) -> Any:
    return state.get("format") if isinstance(state, dict) else type(state).__name__


def _legacy_globals() -> list:
    """What an EDGECLC1 payload may reference besides torch's own safe set: numpy's array,
    dtype and scalar reconstructors (they build data, never call anything else)."""
    import numpy as np
    multiarray = getattr(np, "_core", None) or np.core  # numpy 2, numpy 1
    multiarray = multiarray.multiarray

    dtype_classes = [type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDGSUV"]
    return [(multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
            (multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
            (multiarray.scalar, "numpy.core.multiarray.scalar"),
            (multiarray.scalar, "numpy._core.multiarray.scalar"),
            np.ndarray, np.dtype, *dtype_classes]


# ------------------------------------------------------------------ plain data in, plain out

NDARRAY_TAG = "__edgecl_ndarray__"
NPSCALAR_TAG = "__edgecl_npscalar__"
SET_TAG = "__edgecl_frozenset__"


def _safe_types() -> tuple:
    import torch
    return (type(None), bool, int, float, complex, str, bytes, bytearray, torch.Tensor,
            torch.Size, torch.dtype, torch.device)


def to_safe(obj: Any, path: str = "state") -> Any:
    """`obj` as what weights_only=True loads: tensors, plain scalars, lists, tuples, sets
    and dicts (OrderedDict and Counter kept); numpy arrays and scalars as tagged tensors or
    bytes. TypeError, naming where, for anything else (e.g. a deque or an object array)."""
    import numpy as np

    if isinstance(obj, np.generic):  # before the scalars: np.float64 is a float subclass
        return {NPSCALAR_TAG: [obj.dtype.str, to_safe(obj.item(), path)]}
    if isinstance(obj, np.ndarray):
        return {NDARRAY_TAG: _array_to_safe(obj, path)}
    if isinstance(obj, _safe_types()):
        return obj
    if type(obj) in (list, tuple, set):
        items = [to_safe(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        return items if type(obj) is list else type(obj)(items)
    if type(obj) is frozenset:
        return {SET_TAG: [to_safe(v, f"{path}[]") for v in obj]}
    if type(obj).__name__ in ("dict", "OrderedDict", "Counter") and isinstance(obj, dict):
        out = type(obj)()
        for key, value in obj.items():
            out[to_safe(key, f"{path} key")] = to_safe(value, f"{path}[{key!r}]")
        return out
    raise TypeError(f"checkpoint state at {path} is a {type(obj).__module__}."
                    f"{type(obj).__qualname__}, which a checkpoint may not hold (tensors, "
                    "numpy arrays, plain scalars, lists, tuples, sets and dicts only)")


def _array_to_safe(array, path: str) -> dict:
    import torch

    if array.dtype.hasobject:
        raise TypeError(f"checkpoint state at {path} is a numpy object array, which a "
                        "checkpoint may not hold")
    array = array.copy()  # contiguous, owns its memory, never aliased by the saved tensor
    if array.dtype.isnative and array.dtype.kind in "biufc" and array.dtype.itemsize <= 16:
        try:
            return {"dtype": array.dtype.str, "tensor": torch.from_numpy(array)}
        except TypeError:  # a dtype torch has no tensor for (uint16 on old torch, ...)
            pass
    return {"dtype": array.dtype.str, "shape": list(array.shape), "bytes": array.tobytes()}


def from_safe(obj: Any) -> Any:
    """Undo to_safe: tagged arrays and scalars become numpy again, every container walked."""
    import numpy as np

    if type(obj) is dict and len(obj) == 1:
        (tag, value), = obj.items()
        if tag == NDARRAY_TAG:
            dtype = np.dtype(value["dtype"])
            if "tensor" in value:
                return value["tensor"].numpy().astype(dtype, copy=False)
            return np.frombuffer(bytearray(value["bytes"]), dtype).reshape(value["shape"])
        if tag == NPSCALAR_TAG:
            return np.dtype(value[0]).type(value[1])
        if tag == SET_TAG:
            return frozenset(from_safe(v) for v in value)
    if isinstance(obj, dict):
        out = type(obj)()
        for key, value in obj.items():
            out[from_safe(key)] = from_safe(value)
        return out
    if type(obj) in (list, tuple, set):
        items = [from_safe(v) for v in obj]
        return items if type(obj) is list else type(obj)(items)
    return obj


class CheckpointStore:
    """The newest KEEP checkpoints in `directory`, named by the offset they cover."""

    def __init__(self, directory: str | os.PathLike, keep: int = KEEP):
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(f"{TMP_PREFIX}*"):
            stale.unlink()  # a write a crash interrupted

    def paths(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        return sorted(p for p in self.directory.glob(f"*{SUFFIX}") if p.stem.isdigit())

    def save(self, state: dict) -> tuple[Path, int]:
        """Write `state` (its `covered` names the file) and prune; returns path and bytes."""
        data = encode(state)
        path = self.directory / f"{state['covered']:020d}{SUFFIX}"
        write_atomic(path, data)
        for old in self.paths()[:-self.keep]:
            old.unlink()
        return path, len(data)

    def load_newest(self) -> tuple[dict, Path] | None:
        """The newest checkpoint that reads back whole; a damaged one is skipped with a log
        line. None when there is none; UserError when there are some but none is whole."""
        paths = self.paths()
        for path in reversed(paths):
            try:
                return read_checkpoint(path), path
            except CheckpointRefused as exc:
                aside = path.with_name(path.name + ".refused")
                os.replace(path, aside)  # kept for inspection, out of the way of pruning
                log.error("checkpoint %s: %s; moved to %s, trying an older one", path, exc,
                          aside.name)
            except (CheckpointDamaged, OSError) as exc:
                log.warning("checkpoint %s does not read back (%s); trying an older one", path,
                            exc)
        if paths:
            raise UserError(f"no checkpoint in {self.directory} reads back whole; move that "
                            "directory and the journal aside to start over from nothing")
        return None

    def newest_covered(self) -> int:
        """The offset the newest checkpoint file covers, from its name (no reading)."""
        paths = self.paths()
        return int(paths[-1].stem) if paths else 0

    def oldest_covered(self) -> int:
        """The offset every kept checkpoint covers (journal segments below it can go)."""
        paths = self.paths()
        return int(paths[0].stem) if paths else 0


class StateKeeper:
    """Restores the daemon at start, replays the journal, and checkpoints it as it learns.

    Parts other features keep in the checkpoint (the held-out slice) are registered with
    `add_part(name, get_state, set_state)` and restored after every feature has started.
    """

    def __init__(self, daemon, journal: Journal, every_steps: int, every_s: float):
        self.daemon = daemon
        self.journal = journal
        self.every_steps = every_steps
        self.every_s = every_s
        self._lock_file = _lock_state_dir(daemon.state_dir)
        try:
            self.store = CheckpointStore(daemon.state_dir / "checkpoints")
        except OSError as exc:
            raise UserError(f"cannot use {daemon.state_dir / 'checkpoints'}: "
                            f"{exc.strerror or exc}") from None
        self.duplicates = DurableCounter(daemon.state_dir / DUPLICATES_FILE,
                                         fsync=journal.fsync == "batch")
        self._parts: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {}
        self._saved_parts: dict = {}
        # Learner thread's record of what it consumed: covered offset, dedup, batch count.
        self.covered = 0
        self.covered_seen = SeenSequences(daemon.seen.window, daemon.seen.max_sensors)
        self.batches_covered = 0
        self.replay_end = 0
        self._record_firsts: list[int] = []  # journal records at start (batch counts)
        self._newest_at_start = 0
        self._saved_covered: int | None = None
        self._changed = False  # the learner changed without new samples (a merge)
        self._saved_steps = 0
        self._saved_at = time.monotonic()
        self.status: dict = {"covered": 0, "path": None, "bytes": None, "seconds": None,
                             "time": None, "restored_from": None, "replayed_samples": 0,
                             "error": None}

    # -- startup (main thread, before the daemon's threads) ---------------------------------

    def restore_offsets(self) -> None:
        """The torch-free half of a restart, before the sockets open: the journal gives the
        stream offset, the dedup record and the classes, so pushes are acked (and retries
        recognised) while the learner still loads. Checkpoint file names say how far the
        newest covers. On failure (a full disk, ...) the state directory's lock is freed, so
        a retry in this process can run."""
        try:
            self._restore_offsets()
        except BaseException:
            self.close()
            raise

    def _restore_offsets(self) -> None:
        daemon = self.daemon
        newest = self.store.newest_covered()
        next_offset, records = self.journal.open(0)
        for record in records:
            daemon.seen.record(record.sensor, record.seq, record.first, record.n)
            daemon.note_classes(record.labels)
        next_offset = max(next_offset, newest)
        self._record_firsts = [record.first for record in records]
        self._newest_at_start = newest
        daemon.counts.restore_received(next_offset, self.duplicates.value,
                                       sum(first >= newest for first in self._record_firsts))
        self.replay_end = next_offset
        self._publish()  # status has its checkpoint fields from the first request on

    def restore_learner(self) -> None:
        """The torch half (learner thread): the newest checkpoint that reads back whole into
        the learner, its counters and its dedup record (merged by the socket loop)."""
        daemon = self.daemon
        loaded = self.store.load_newest()
        if loaded is not None:
            self._apply(*loaded)
        self._saved_covered = self.covered if loaded is not None else None
        self._saved_steps = daemon.learner.steps
        if loaded is not None or self.replay_end:
            log.info("restored: checkpoint %s covers %d samples; %d journaled samples to replay",
                     loaded[1].name if loaded else "(none)", self.covered,
                     self.replay_end - self.covered)
        self._publish()

    def _apply(self, state: dict, path: Path) -> None:
        daemon = self.daemon
        learner_state = state["learner"]
        configured = daemon.learner.config if isinstance(daemon.learner, HasSettings) else None
        if is_dataclass(configured):
            differ = sorted(k for k, v in asdict(configured).items()
                            if k != "threads" and learner_state["config"].get(k) != v)
            if differ:
                log.warning("the checkpoint's learner settings differ from the configured ones "
                            "(%s); continuing with the checkpoint's. Use a fresh --state-dir to "
                            "start over with the new settings", ", ".join(differ))
        try:
            daemon.learner.load_state_dict(learner_state)
        except Exception as exc:
            raise UserError(f"checkpoint {path} reads back but does not load into this "
                            f"learner ({type(exc).__name__}: {exc}); move {path.parent} and "
                            "the journal aside to start over") from None
        self.covered = int(state["covered"])
        counters = state["counters"]
        daemon.counts.restore_consumed(counters)
        self.batches_covered = int(counters["batches_covered"])
        self.covered_seen.load_state_dict(state["dedup"])
        # what the socket loop counted from the journal at start assumed the newest file
        counted = sum(first >= self._newest_at_start for first in self._record_firsts)
        batches = self.batches_covered + sum(first >= self.covered
                                             for first in self._record_firsts) - counted
        daemon.merge_restored(state["dedup"], int(counters["samples_duplicate"]), batches)
        self._saved_parts = state.get("parts", {})
        self.status["restored_from"] = path.name

    def add_part(self, name: str, get_state: Callable[[], Any],
                 set_state: Callable[[Any], None]) -> None:
        self._parts[name] = (get_state, set_state)

    def restore_parts(self) -> None:
        """Hand each registered part its saved state (after every feature started)."""
        for name, (_, set_state) in self._parts.items():
            if name in self._saved_parts:
                set_state(self._saved_parts[name])
        self._saved_parts = {}

    # -- learner thread ---------------------------------------------------------------------

    def replay(self, learn: Callable[[list[Batch]], None], learn_batch: int,
               stopped: Callable[[], bool] = lambda: False,
               offer: Callable[[list[Batch]], None] | None = None,
               keep_samples: int = 0) -> None:
        """Learn the journaled pushes the checkpoint does not cover, grouped as the queue
        would group them, before anything new, then checkpoint (a crash loop does not replay
        a growing journal from zero). `stopped()` ends it early (a second signal: what is
        left stays in the journal for the next start). With `offer` (the real-time policy),
        a push followed by at least `keep_samples` more journaled samples is offered to the
        replay buffer, not learned: the rule the policy applies to a live backlog."""
        if self.replay_end <= self.covered:
            return
        started, group, group_how, total = time.monotonic(), [], None, 0
        for batch in self.journal.records(self.covered, self.replay_end):
            if stopped():
                return
            how, limit = learn, learn_batch
            if offer is not None and self.replay_end - batch.first - batch.n >= keep_samples:
                how, limit = offer, OFFER_GROUP
            if group and (how is not group_how or not joins_group(total, batch.n, limit)):
                self._replay_group(group_how, group)
                group, total = [], 0
            group.append(batch)
            group_how = how
            total += batch.n
        if group:
            self._replay_group(group_how, group)
        log.info("replayed %d journaled samples in %.1f s", self.status["replayed_samples"],
                 time.monotonic() - started)
        self.save()
        if self.covered < self.replay_end:
            log.error("the journal ends at offset %d, before the %d acked before the restart: "
                      "%d acked samples are missing (damaged journal)", self.covered,
                      self.replay_end, self.replay_end - self.covered)

    def _replay_group(self, how, group: list[Batch]) -> None:
        how(group)
        self.learned(group)
        self.status["replayed_samples"] += sum(b.n for b in group)
        self.maybe_save()

    def learned(self, batches: list[Batch]) -> None:
        """The learner has consumed these pushes (in stream order)."""
        for batch in batches:
            self.covered_seen.record(batch.sensor, batch.seq, batch.first, batch.n)
            self.covered = batch.first + batch.n
        self.batches_covered += len(batches)

    def learner_changed(self) -> None:
        """The learner changed outside learning (a merged global model): the next due or
        final checkpoint is written even if no new sample was learned."""
        self._changed = True

    def maybe_save(self) -> None:
        """Checkpoint if `every_steps` learner steps or `every_s` seconds have passed since
        the last one and something new was learned."""
        steps = self.daemon.learner.steps
        if (self.every_steps and steps - self._saved_steps >= self.every_steps) or \
                (self.every_s and time.monotonic() - self._saved_at >= self.every_s):
            self.save()

    def save(self) -> None:
        """Write a checkpoint now (if anything changed); a failure is logged and shown in
        status, and the journal keeps every record until a later checkpoint succeeds."""
        if not self._changed and (self.covered == self._saved_covered or (
                self.covered == 0 and self._saved_covered is None)):
            self._saved_at = time.monotonic()
            return
        daemon = self.daemon
        started = time.perf_counter()
        try:
            state = {
                "format": FORMAT, "covered": self.covered, "created": time.time(),
                "learner": daemon.learner.state_dict(),
                "dedup": self.covered_seen.state_dict(),
                "counters": {**daemon.counts.checkpointed(),
                             "batches_covered": self.batches_covered},
                "parts": {name: get_state() for name, (get_state, _) in self._parts.items()},
                "snapshot_version": daemon.status().get("snapshot_version"),
            }
            path, size = self.store.save(state)
            removed = self.journal.remove_covered(self.store.oldest_covered())
        except Exception as exc:
            reason = exc.strerror if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
            self.status["error"] = f"cannot write a checkpoint in {self.store.directory}: {reason}"
            log.error("%s; the journal keeps every record until one succeeds",
                      self.status["error"], exc_info=not isinstance(exc, OSError))
            self._saved_at = time.monotonic()  # retry at the next due time, not every step
            self._publish()
            return
        seconds = time.perf_counter() - started
        self._saved_covered = self.covered
        self._changed = False
        self._saved_steps = daemon.learner.steps
        self._saved_at = time.monotonic()
        self.status.update(covered=self.covered, path=path.name, bytes=size,
                           seconds=round(seconds, 4), time=time.time(), error=None)
        log.info("checkpoint %s: %d samples covered, %.0f KiB in %.2f s%s", path.name,
                 self.covered, size / 1024, seconds,
                 f", {removed} journal segments removed" if removed else "")
        self._publish()

    def _publish(self) -> None:
        self.daemon.update_status(checkpoint=dict(self.status))

    def note_duplicates(self, total: int) -> None:
        """The socket loop answered a duplicate: keep the new total on disk before the ack."""
        self.duplicates.set(total)

    def close(self) -> None:
        self.journal.close()
        self.duplicates.close()
        self._lock_file.close()


def _lock_state_dir(state_dir: Path):
    """One daemon per state directory: two writing one journal would corrupt it."""
    path = state_dir / LOCK_FILE
    try:
        fh = open(path, "a")
    except OSError as exc:
        raise UserError(f"cannot write in the state directory {state_dir}: "
                        f"{exc.strerror or exc}") from None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise UserError(f"another edgecl daemon is using the state directory {state_dir}; "
                        "stop it or choose another --state-dir") from None
    return fh
