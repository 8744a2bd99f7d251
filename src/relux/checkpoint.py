"""Checkpoint directories of ``relux extract --checkpoint DIR``: a query journal plus a small state file.

An extraction is deterministic for a fixed seed given identical oracle answers, so a checkpoint is
the journal of every answer the victim gave (:class:`~relux.oracle.journal.JournalOracle`, file
``journal.bin``) together with ``state.json``, which says which run the journal belongs to: the
architecture, the extraction configuration, the victim's identity, and the run's status and query
counts. A rerun with the same directory replays the journal (no victim queries) and continues live
where it ends; a rerun with another architecture, configuration or victim is refused.

``state.json`` is replaced atomically (temporary file, fsync, ``os.replace``); ``journal.bin`` is
append-only, handed to the OS after every batch and synced to disk at least once a second (see
:mod:`relux.oracle.journal`). A lock file keeps two processes out of one directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from relux.errors import InputError
from relux.model import format_arch
from relux.oracle.base import Oracle
from relux.oracle.journal import JournalOracle, sync_dir

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
JOURNAL_FILE = "journal.bin"
LOCK_FILE = "lock"
FORMAT = "relux-checkpoint"
FORMAT_VERSION = 1

#: Configuration keys that do not change which queries an extraction asks (they are not compared on
#: resume): progress display and the parallel execution settings (the oracle is always queried from
#: the main process, and the result of a fixed seed does not depend on the workers).
NEUTRAL_CONFIG_KEYS = frozenset({"progress", "jobs", "backend", "ray_address"})

Status = Literal["running", "complete", "interrupted", "failed"]


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def victim_identity(*, model: str | None = None, url: str | None = None, oracle: str | None = None) -> dict[str, str]:
    """What identifies the victim behind an oracle, for exactly one of the three CLI sources.

    A model file is identified by the SHA-256 of its bytes (its path is kept for information only,
    so a moved file still matches); an endpoint by its URL; a Python callable by its ``FILE.py:NAME``
    spec and, when FILE.py is a file, the SHA-256 of that file.
    """
    if sum(x is not None for x in (model, url, oracle)) != 1:
        raise InputError("expected exactly one victim: a model file, a URL or a callable")
    if model is not None:
        return {"kind": "model file", "path": str(Path(model).resolve()), "sha256": file_sha256(model)}
    if url is not None:
        return {"kind": "endpoint", "url": url}
    assert oracle is not None
    ident = {"kind": "callable", "spec": oracle}
    target = oracle.rpartition(":")[0]
    if target and Path(target).is_file():
        ident["sha256"] = file_sha256(target)
    return ident


def _plain(obj: Any) -> Any:
    """JSON round trip: tuples become lists, so recorded and current values compare equal."""
    return json.loads(json.dumps(obj))


@dataclass(frozen=True, eq=False)
class RunIdentity:
    """What a checkpoint's journal depends on: a resume must match it exactly."""

    arch: tuple[int, ...]
    config: Mapping[str, Any] = field(default_factory=dict)
    victim: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"arch": list(self.arch), "config": _plain(dict(self.config)), "victim": _plain(dict(self.victim))}

    def differences(self, recorded: Mapping[str, Any]) -> list[str]:
        """Human-readable differences between ``recorded`` (a state.json) and this run; empty if none."""
        mine = self.to_json()
        diffs: list[str] = []
        if recorded.get("arch") != mine["arch"]:
            theirs = recorded.get("arch")
            shown = format_arch(theirs) if isinstance(theirs, list) and theirs else repr(theirs)
            diffs.append(f"architecture {shown} (checkpoint) vs {format_arch(self.arch)} (now)")
        rc = recorded.get("config") if isinstance(recorded.get("config"), dict) else {}
        assert isinstance(rc, dict)
        for key in sorted((set(rc) | set(mine["config"])) - NEUTRAL_CONFIG_KEYS):
            if rc.get(key) != mine["config"].get(key):
                diffs.append(f"{key} {rc.get(key)!r} (checkpoint) vs {mine['config'].get(key)!r} (now)")
        rv = recorded.get("victim") if isinstance(recorded.get("victim"), dict) else {}
        assert isinstance(rv, dict)
        mv = mine["victim"]
        if rv.get("kind") != mv.get("kind"):
            diffs.append(f"victim {rv.get('kind')} (checkpoint) vs {mv.get('kind')} (now)")
        else:
            for key in ("sha256", "url", "spec"):
                if rv.get(key) != mv.get(key):
                    what = "file sha256" if key == "sha256" else key
                    diffs.append(f"victim {what} {rv.get(key)} (checkpoint) vs {mv.get(key)} (now)")
        return diffs


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees the old file or the new one, whole."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, allow_nan=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    sync_dir(path.parent)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _acquire_lock(path: Path, directory: Path) -> int:
    """An exclusive lock on ``path`` for this process (released when the descriptor closes or the
    process dies); :class:`InputError` if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if sys.platform != "win32":
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise InputError(
                f"checkpoint directory {directory} is in use by another relux process (pid {holder}); "
                "wait for it to finish or use another --checkpoint directory"
            ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class Checkpoint:
    """An open checkpoint directory. Use :meth:`open`, then :meth:`wrap` the victim's oracle, run the
    extraction through the wrapper, :meth:`save` the outcome and :meth:`close`."""

    def __init__(self, directory: Path, identity: RunIdentity, state: dict[str, Any], lock_fd: int) -> None:
        self.directory = directory
        self.identity = identity
        self.state = state
        self.journal: JournalOracle | None = None
        self._lock_fd: int | None = lock_fd

    # ----------------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, directory: str | os.PathLike[str], identity: RunIdentity) -> Checkpoint:
        """Create ``directory`` (its parent must exist) or resume the checkpoint it holds.

        Raises :class:`InputError` when the directory holds something else, is in use, or holds the
        checkpoint of a run with another architecture, configuration or victim.
        """
        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise InputError(f"--checkpoint {d} is a file; expected a directory (new or from an earlier run)")
        if not d.exists():
            if not d.parent.is_dir():
                raise InputError(f"--checkpoint {d}: directory {d.parent} does not exist; create it first")
            d.mkdir()
        state_path = d / STATE_FILE
        previous: dict[str, Any] | None = None
        if state_path.exists():
            try:
                loaded = json.loads(state_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InputError(
                    f"--checkpoint {d}: {STATE_FILE} is unreadable ({exc}); use a fresh directory"
                ) from None
            if not (isinstance(loaded, dict) and loaded.get("format") == FORMAT):
                raise InputError(f"--checkpoint {d}: {STATE_FILE} is not a relux checkpoint; use a fresh directory")
            previous = loaded
        else:
            # The lock and a temporary state file are what a run killed while creating the directory leaves.
            others = sorted(
                p.name for p in d.iterdir() if p.name != LOCK_FILE and not p.name.startswith(f"{STATE_FILE}.tmp")
            )
            if others:
                shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
                raise InputError(
                    f"--checkpoint {d} is not empty ({shown}) and holds no relux checkpoint; "
                    "give a new or empty directory"
                )
        lock_fd = _acquire_lock(d / LOCK_FILE, d)
        try:
            state = cls._initial_state(d, identity, previous)
            write_json_atomic(state_path, state)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(d, identity, state, lock_fd)

    @staticmethod
    def _initial_state(d: Path, identity: RunIdentity, previous: dict[str, Any] | None) -> dict[str, Any]:
        from relux import __version__

        if previous is not None:
            if previous.get("format_version") != FORMAT_VERSION:
                raise InputError(
                    f"--checkpoint {d} has checkpoint format {previous.get('format_version')!r}; this relux "
                    f"reads format {FORMAT_VERSION}; use a fresh directory"
                )
            diffs = identity.differences(previous)
            if diffs:
                raise InputError(
                    f"--checkpoint {d} belongs to a different run: {'; '.join(diffs)}. Rerun with the "
                    "checkpoint's settings, or use a fresh --checkpoint directory (or delete this one)"
                )
            if previous.get("relux_version") != __version__:
                log.warning(
                    "checkpoint %s was written by relux %s (this is %s); answers are replayed only as long "
                    "as the queries agree", d, previous.get("relux_version"), __version__,
                )
            log.info("resuming checkpoint %s (previous run: %s)", d, previous.get("status"))
        created = previous.get("created", _now()) if previous is not None else _now()
        runs = int(previous.get("runs", 0)) + 1 if previous is not None else 1
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "relux_version": __version__,
            **identity.to_json(),
            "status": "running",
            "error": None,
            "runs": runs,
            "queries_live": 0,
            "queries_replayed": 0,
            "journal_batches": None,
            "journal_queries": None,
            "created": created,
            "updated": _now(),
        }

    # ----------------------------------------------------------------------------------- use
    @property
    def journal_path(self) -> Path:
        return self.directory / JOURNAL_FILE

    @property
    def resumed(self) -> bool:
        """Whether this run continues an earlier one."""
        return int(self.state["runs"]) > 1

    def wrap(self, oracle: Oracle) -> JournalOracle:
        """The journaling wrapper of ``oracle``: the extraction must query only through it."""
        if self.journal is not None:
            raise ValueError("a checkpoint wraps one oracle")
        self.journal = JournalOracle(oracle, self.journal_path)
        return self.journal

    @property
    def queries_live(self) -> int:
        return 0 if self.journal is None else self.journal.queries_live

    @property
    def queries_replayed(self) -> int:
        return 0 if self.journal is None else self.journal.queries_replayed

    def save(self, status: Status, *, error: str | None = None) -> None:
        """Record the run's status and query counts in ``state.json`` (atomically).

        On ``"complete"``, journal records this run never replayed (left by a diverged earlier run)
        are dropped from the journal.
        """
        j = self.journal
        if j is not None and not j.closed:
            j.sync()  # the state must never claim more than the journal holds on disk
            if status == "complete" and j.unused_batches:
                dropped = j.compact()
                log.info("checkpoint %s: dropped %d journal records this run did not use", self.directory, dropped)
        self.state.update(
            status=status,
            error=error,
            queries_live=self.queries_live,
            queries_replayed=self.queries_replayed,
            journal_batches=None if j is None else j.journal_batches,
            journal_queries=None if j is None else j.journal_queries,
            updated=_now(),
        )
        write_json_atomic(self.directory / STATE_FILE, self.state)

    def close(self) -> None:
        """Close the journal and release the directory lock (the files stay)."""
        if self.journal is not None:
            self.journal.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint directory (for reports and tests)."""
    data = json.loads((Path(directory) / STATE_FILE).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise InputError(f"{directory}/{STATE_FILE} is not a relux checkpoint state")
    return data


__all__ = [
    "Checkpoint",
    "RunIdentity",
    "victim_identity",
    "read_state",
    "write_json_atomic",
    "file_sha256",
    "NEUTRAL_CONFIG_KEYS",
    "STATE_FILE",
    "JOURNAL_FILE",
]
