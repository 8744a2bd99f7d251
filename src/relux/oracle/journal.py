"""A durable journal of an oracle's answers, so that an interrupted extraction can resume.

An extraction is deterministic for a fixed seed given identical answers, so the journal needs no
snapshot of the attack's state: it records, for every query batch, a digest of the batch and the
oracle's answer. A rerun with the same seed asks the same batches again; :class:`JournalOracle`
answers those from the journal without calling the victim and goes live where the journal ends.

The file is append-only. Each record is written in one piece and flushed to the operating system
before the answer is handed to the attack, so a record the attack has seen survives the death of the
process (SIGKILL, Ctrl-C, a crash). It is also ``fdatasync``'d at least every ``sync_interval``
seconds (default 1 s; 0 syncs every batch) and on close, which bounds what a power failure can lose
without paying a disk sync per batch (about 0.3 ms each, a third of the run time of a small local
extraction). Every record carries its length and a CRC-32, so a torn last record (SIGKILL mid-write)
or a damaged tail is detected on load and dropped: the loader always yields a prefix of the records
that were written.

File layout (little-endian)::

    b"RELUXJ01"                                          file header
    then per record:
      b"RJR1"  payload_len:u64  crc32(payload):u32       frame (16 bytes)
      seq:u64  rows:u64  input_dim:u32  output_dim:u32  digest:16 bytes
      answer: rows * output_dim float64                  payload

The inputs themselves are not stored (a 784-dimensional batch is ~100 times its answer); their digest
(BLAKE2b-128 of the shape and the float64 bytes) identifies a batch.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np

from relux.errors import InputError
from relux.oracle.base import FloatArray, Oracle, as_query_batch, check_answer
from relux.oracle.wrappers import OracleWrapper

log = logging.getLogger(__name__)

FILE_MAGIC = b"RELUXJ01"
RECORD_MAGIC = b"RJR1"
_FRAME = struct.Struct("<4sQI")  # magic, payload length, CRC-32 of the payload
_HEAD = struct.Struct("<QQII16s")  # seq, rows, input_dim, output_dim, digest
_DIGEST_BYTES = 16
#: Largest payload the loader accepts (a corrupt length must not make it allocate terabytes).
_MAX_PAYLOAD = 1 << 36


def batch_digest(X: FloatArray) -> bytes:
    """BLAKE2b-128 of a query batch: its shape and its float64 (little-endian, C order) bytes."""
    A = np.ascontiguousarray(X, dtype="<f8")
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES, person=b"relux-journal")
    h.update(struct.pack("<QQ", *(A.shape if A.ndim == 2 else (A.size, 1))))
    h.update(A.data)
    return h.digest()


@dataclass(frozen=True)
class JournalRecord:
    """Where one recorded batch lives in the journal file (the answer itself is read on demand)."""

    seq: int
    digest: bytes
    rows: int
    input_dim: int
    output_dim: int
    answer_offset: int  #: file offset of the answer's float64 bytes
    end: int  #: file offset just past the record


@dataclass(frozen=True)
class JournalIndex:
    """The valid records of a journal file, and how many bytes after them were dropped."""

    records: tuple[JournalRecord, ...]
    valid_bytes: int
    file_bytes: int

    @property
    def dropped_bytes(self) -> int:
        return self.file_bytes - self.valid_bytes

    @property
    def queries(self) -> int:
        return sum(r.rows for r in self.records)


def _encode(seq: int, digest: bytes, input_dim: int, Y: FloatArray) -> bytes:
    answer = np.ascontiguousarray(Y, dtype="<f8")
    payload = _HEAD.pack(seq, answer.shape[0], input_dim, answer.shape[1], digest) + answer.tobytes()
    return _FRAME.pack(RECORD_MAGIC, len(payload), zlib.crc32(payload)) + payload


def scan_journal(fh: BinaryIO, file_bytes: int, *, name: str = "journal") -> JournalIndex:
    """Index the valid prefix of an open journal file of ``file_bytes`` bytes.

    Reading stops at the first record that is incomplete, fails its checksum or is out of sequence;
    everything from there on is reported as dropped. A file that does not start with the journal
    header (and is not a truncated header, i.e. a torn creation) raises :class:`InputError`.
    """
    fh.seek(0)
    header = fh.read(len(FILE_MAGIC))
    if header != FILE_MAGIC:
        if FILE_MAGIC.startswith(header):  # empty or torn while being created
            return JournalIndex((), 0, file_bytes)
        raise InputError(
            f"{name} is not a relux query journal (it starts with {header[:8]!r}); "
            "use a fresh --checkpoint directory"
        )
    records: list[JournalRecord] = []
    pos = len(FILE_MAGIC)
    while True:
        frame = fh.read(_FRAME.size)
        if len(frame) < _FRAME.size:
            break
        magic, length, crc = _FRAME.unpack(frame)
        if magic != RECORD_MAGIC or not (_HEAD.size <= length <= min(_MAX_PAYLOAD, file_bytes - pos - _FRAME.size)):
            break
        payload = fh.read(length)
        if len(payload) < length or zlib.crc32(payload) != crc:
            break
        seq, rows, d, k, digest = _HEAD.unpack_from(payload)
        if seq != len(records) or length != _HEAD.size + 8 * rows * k:
            break
        end = pos + _FRAME.size + length
        records.append(JournalRecord(seq, digest, rows, d, k, pos + _FRAME.size + _HEAD.size, end))
        pos = end
    return JournalIndex(tuple(records), pos, file_bytes)


def read_journal(path: str | os.PathLike[str]) -> JournalIndex:
    """Index the valid records of the journal at ``path`` (see :func:`scan_journal`)."""
    with open(path, "rb") as fh:
        return scan_journal(fh, os.fstat(fh.fileno()).st_size, name=str(path))


def _sync(fh: BinaryIO) -> None:
    fh.flush()
    sync = getattr(os, "fdatasync", os.fsync)
    sync(fh.fileno())


def sync_dir(path: Path) -> None:
    """Make a new or renamed directory entry durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class JournalOracle(OracleWrapper):
    """Answers batches recorded in ``path`` from the journal; asks ``inner`` for the rest and records them.

    A batch is matched by its digest: the first unused record with that digest answers it (records
    with the same digest are used in the order they were written, so repeated batches, e.g. the
    noise-floor measurement, replay their distinct answers). Matching by digest rather than by
    position also tolerates batches that concurrent workers issue in another order. A batch with no
    unused record goes to ``inner``; if recorded batches are still unused at that moment, the run has
    diverged from the one that wrote the journal, which is logged once.

    Counters: ``queries_replayed`` / ``batches_replayed`` (answered from the journal) and
    ``queries_live`` / ``batches_live`` (answered by ``inner``) for this process. Thread-safe.
    Close it (or use it as a context manager) when done.
    """

    def __init__(self, inner: Oracle, path: str | os.PathLike[str], *, sync_interval: float = 1.0) -> None:
        super().__init__(inner)
        if not sync_interval >= 0:
            raise InputError(f"sync_interval: expected seconds >= 0, found {sync_interval!r}")
        self.path = Path(path)
        self.sync_interval = float(sync_interval)
        self._lock = threading.Lock()
        existed = self.path.exists()
        self._fh: BinaryIO = open(self.path, "r+b" if existed else "w+b")
        try:
            index = scan_journal(self._fh, os.fstat(self._fh.fileno()).st_size, name=str(self.path))
            if index.dropped_bytes:
                log.warning(
                    "checkpoint journal %s: dropped %d bytes after %d valid records (a record torn by an "
                    "interruption); those queries will be asked again",
                    self.path, index.dropped_bytes, len(index.records),
                )
            if index.valid_bytes == 0:
                self._fh.seek(0)
                self._fh.truncate(0)
                self._fh.write(FILE_MAGIC)
                valid = len(FILE_MAGIC)
            else:
                valid = index.valid_bytes
            self._fh.truncate(valid)
            self._fh.seek(valid)
            _sync(self._fh)
            if not existed:
                sync_dir(self.path.parent)
        except BaseException:
            self._fh.close()
            raise
        self._records: list[JournalRecord] = list(index.records)
        self._unused: dict[bytes, collections.deque[int]] = {}
        for r in self._records:
            self._unused.setdefault(r.digest, collections.deque()).append(r.seq)
        self._n_unused = len(self._records)
        self._used = [False] * len(self._records)
        self._diverged = False
        self._synced_at = time.monotonic()
        self.queries_replayed = 0
        self.batches_replayed = 0
        self.queries_live = 0
        self.batches_live = 0

    # ----------------------------------------------------------------------------------- state
    @property
    def journal_batches(self) -> int:
        """Records in the journal file (replayable by a later run)."""
        return len(self._records)

    @property
    def journal_queries(self) -> int:
        """Query rows recorded in the journal file."""
        return sum(r.rows for r in self._records)

    @property
    def unused_batches(self) -> int:
        """Records loaded from the file that this run has not (yet) replayed."""
        return self._n_unused

    @property
    def closed(self) -> bool:
        return self._fh.closed

    # ----------------------------------------------------------------------------------- query
    def _take(self, digest: bytes, rows: int) -> JournalRecord | None:
        queue = self._unused.get(digest)
        while queue:
            rec = self._records[queue.popleft()]
            self._used[rec.seq] = True
            self._n_unused -= 1
            if rec.rows == rows and rec.input_dim == self.input_dim and rec.output_dim == self.output_dim:
                return rec
        return None

    def query(self, X: FloatArray) -> FloatArray:
        A = as_query_batch(X, self.input_dim)
        n = A.shape[0]
        digest = batch_digest(A)
        with self._lock:
            if self._fh.closed:
                raise ValueError(f"query on a closed journal ({self.path})")
            rec = self._take(digest, n)
            if rec is not None:
                self._fh.seek(rec.answer_offset)
                raw = self._fh.read(8 * rec.rows * rec.output_dim)
                self._fh.seek(0, os.SEEK_END)
                self.queries_replayed += n
                self.batches_replayed += 1
                return np.frombuffer(raw, dtype="<f8").astype(np.float64).reshape(rec.rows, rec.output_dim)
            if self._n_unused and not self._diverged:
                self._diverged = True
                log.warning(
                    "query batch %d is not in the checkpoint journal %s although %d recorded batches are "
                    "unused: this run has diverged from the one that wrote it (another relux version or "
                    "configuration?); continuing with live queries",
                    self.batches_replayed + self.batches_live, self.path, self._n_unused,
                )
        Y = check_answer(self.inner.query(A), n, self.output_dim, type(self.inner).__name__)
        with self._lock:
            if self._fh.closed:
                raise ValueError(f"query on a closed journal ({self.path})")
            seq = len(self._records)
            start = self._fh.seek(0, os.SEEK_END)
            data = _encode(seq, digest, self.input_dim, Y)
            self._fh.write(data)
            self._fh.flush()  # in the OS's hands: survives the death of this process
            now = time.monotonic()
            if now - self._synced_at >= self.sync_interval:
                _sync(self._fh)
                self._synced_at = now
            self._records.append(
                JournalRecord(seq, digest, n, self.input_dim, self.output_dim,
                              start + _FRAME.size + _HEAD.size, start + len(data))
            )
            self._used.append(True)
            self.queries_live += n
            self.batches_live += 1
        return Y

    # ----------------------------------------------------------------------------------- lifecycle
    def compact(self) -> int:
        """Rewrite the journal without the records this run did not use; returns how many were dropped.

        Call it once a run has finished: records it never replayed belong to a diverged earlier run
        and would only cost disk space. The new file replaces the old one atomically.
        """
        with self._lock:
            if self._fh.closed:
                raise ValueError(f"compact on a closed journal ({self.path})")
            dropped = sum(1 for u in self._used if not u)
            if not dropped:
                return 0
            tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
            kept: list[JournalRecord] = []
            with open(tmp, "wb") as out:
                out.write(FILE_MAGIC)
                for rec, used in zip(self._records, self._used, strict=True):
                    if not used:
                        continue
                    self._fh.seek(rec.answer_offset)
                    Y = np.frombuffer(self._fh.read(8 * rec.rows * rec.output_dim), dtype="<f8")
                    data = _encode(len(kept), rec.digest, rec.input_dim, Y.reshape(rec.rows, rec.output_dim))
                    start = out.tell()
                    out.write(data)
                    kept.append(JournalRecord(len(kept), rec.digest, rec.rows, rec.input_dim, rec.output_dim,
                                              start + _FRAME.size + _HEAD.size, start + len(data)))
                _sync(out)
            os.replace(tmp, self.path)
            sync_dir(self.path.parent)
            self._fh.close()
            self._fh = open(self.path, "r+b")
            self._fh.seek(0, os.SEEK_END)
            self._records = kept
            self._used = [True] * len(kept)
            self._unused = {}
            self._n_unused = 0
            return dropped

    def sync(self) -> None:
        """Force the journal to disk now (``fdatasync``)."""
        with self._lock:
            if not self._fh.closed:
                _sync(self._fh)
                self._synced_at = time.monotonic()

    def close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                _sync(self._fh)
                self._fh.close()

    def __enter__(self) -> JournalOracle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"JournalOracle({self.inner!r}, path={str(self.path)!r})"


__all__ = ["JournalOracle", "JournalIndex", "JournalRecord", "batch_digest", "read_journal", "scan_journal"]
