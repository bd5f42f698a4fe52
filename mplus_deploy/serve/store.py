"""The durable memory store of ``mplus-serve`` (docs/serving.md "Store").

Layout of ``--store DIR``::

    DIR/index.sqlite                        id, version, file, bytes, updates, last_use (WAL, synchronous=FULL)
    DIR/snapshots/<sha256(id)[:40]>-<version>.safetensors   one runtime snapshot per memory (``Session.save_memory``)
    DIR/tmp/                                uploads being validated (emptied at start)

Durability: ``commit`` writes the memory's new snapshot under a new version's name (temp file, fsync, rename,
fsync of the folder: ``snapshot.save``), then points the index row at it in one SQLite transaction
(synchronous=FULL: on disk when ``commit`` returns), then removes the previous file. A crash before the
transaction leaves the previous version in force (the new file is an orphan, removed at the next start); a
crash after it leaves the new one. The server answers 200 only after ``commit`` returned, so an acknowledged
update survives ``kill -9`` and power loss on a filesystem that honours fsync.

Residency: at most ``max_resident`` sessions stay in RAM (least recently used ones are dropped: every
committed state is already on disk, so eviction writes nothing) and are reloaded from their snapshot on
demand. Each id has its own lock (``lock``): requests for one id run one after the other, different ids run
concurrently. A request that fails after touching a session calls ``discard``: the half-updated session is
dropped and the committed state reloads next time.

Several processes on one store (the replicas of ``mplus-serve --ray``, ``serve.ray_app``): an id's lock is also
an exclusive ``flock`` on ``DIR/locks/<stem>.lock``, so its read-modify-commit runs in one process at a time; a
resident session remembers the version it holds and is reloaded when another process committed a newer one
(``session``); and orphan files are removed at start only by a process that has the store to itself (every
open store holds a shared ``flock`` on ``DIR/store.lock``), never under another process's commit in progress.
"""
from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path

from .ids import check_memory_id, file_stem

SCHEMA = """CREATE TABLE IF NOT EXISTS memories (
    id TEXT PRIMARY KEY, version INTEGER NOT NULL, file TEXT NOT NULL, bytes INTEGER NOT NULL,
    updates INTEGER NOT NULL, last_use REAL NOT NULL)"""


def _token(row: dict | None):
    """What identifies one committed state of an id across processes: (version, commit time); a version number
    alone restarts at 1 after a delete."""
    return None if row is None else (row["version"], row["last_use"])


class IdLock:
    """The lock of one memory id: re-entrant across this process's threads (``threading.RLock``) and, while
    held, an exclusive ``flock`` on ``path`` against the other processes that share the store."""

    def __init__(self, path: Path):
        self._thread, self._path, self._depth, self._fd = threading.RLock(), path, 0, None

    def acquire(self, blocking: bool = True) -> bool:
        if not self._thread.acquire(blocking):
            return False
        if self._depth == 0:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BaseException as e:
                os.close(fd)
                self._thread.release()
                if isinstance(e, BlockingIOError):
                    return False
                raise
            self._fd = fd
        self._depth += 1
        return True

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._thread.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class MemoryStore:
    def __init__(self, engine, root, max_resident: int = 8, seed: int | None = 0):
        if max_resident < 1:
            raise ValueError(f"max_resident must be >= 1, got {max_resident}")
        self.engine, self.root, self.max_resident, self.seed = engine, Path(root), int(max_resident), seed
        self.snapshots, self.tmp, self.locks = self.root / "snapshots", self.root / "tmp", self.root / "locks"
        for d in (self.root, self.snapshots, self.tmp, self.locks):
            d.mkdir(parents=True, exist_ok=True)
        self._store_fd = os.open(self.root / "store.lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._db = sqlite3.connect(str(self.root / "index.sqlite"), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(SCHEMA)
        self._dblock = threading.Lock()
        self._resident: OrderedDict[str, tuple] = OrderedDict()  # id -> (session, _token of the row it holds)
        self._rlock = threading.Lock()
        self._locks: dict[str, IdLock] = {}
        self._stats: dict[str, dict] = {}  # memory stats of resident sessions, recorded under their id's lock
        try:  # alone on the store: orphans are a crash's leftovers, remove them
            fcntl.flock(self._store_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._clean()
        except BlockingIOError:
            pass  # another process has it open: a file no row names may be its commit in progress
        fcntl.flock(self._store_fd, fcntl.LOCK_SH)

    # ------------------------------------------------------------------ index
    def _row(self, mid: str) -> dict | None:
        with self._dblock:
            r = self._db.execute("SELECT id, version, file, bytes, updates, last_use FROM memories WHERE id = ?",
                                 (mid,)).fetchone()
        return None if r is None else dict(zip(("id", "version", "file", "bytes", "updates", "last_use"), r))

    def ids(self) -> list[str]:
        with self._dblock:
            return [r[0] for r in self._db.execute("SELECT id FROM memories ORDER BY id")]

    def _clean(self) -> None:
        """Remove what a crash can leave: snapshot files no index row names, and upload temporaries."""
        with self._dblock:
            keep = {r[0] for r in self._db.execute("SELECT file FROM memories")}
        for f in self.snapshots.iterdir():
            if f.name not in keep:
                f.unlink(missing_ok=True)
        for f in self.tmp.iterdir():
            f.unlink(missing_ok=True)

    # ------------------------------------------------------------------ sessions
    def lock(self, mid: str) -> IdLock:
        """The lock of one id (hold it around every read-modify-commit of that memory), in every process."""
        check_memory_id(mid)
        with self._rlock:
            lk = self._locks.get(mid)
            if lk is None:
                lk = self._locks[mid] = IdLock(self.locks / f"{file_stem(mid)}.lock")
            return lk

    def known(self, mid: str) -> bool:
        return self._row(check_memory_id(mid)) is not None

    def session(self, mid: str):
        """The session of ``mid`` (caller holds ``lock(mid)``): resident, else loaded from its snapshot, else a
        new one on the artifact's initial memory (seeded with the store's seed; nothing is written until a
        ``commit``)."""
        row = self._row(mid)
        version = _token(row)
        with self._rlock:
            s, held = self._resident.get(mid, (None, None))
            if s is not None and held == version:  # else another process committed (or deleted) it since
                self._resident.move_to_end(mid)
                return s
        s = self.engine.session(seed=self.seed)
        if row is not None:
            s.load_memory(self.snapshots / row["file"])
        with self._rlock:
            self._resident[mid] = (s, version)
            self._stats[mid] = s.memory
            self._evict()
        return s

    def is_live(self, mid: str) -> bool:
        """Whether ``mid`` has a memory of its own (resident or in the index); otherwise it reads as the initial one."""
        with self._rlock:
            if mid in self._resident:
                return True
        return self._row(mid) is not None

    def _evict(self) -> None:
        """Drop least recently used sessions beyond ``max_resident`` (their committed state is on disk); a
        session whose id is locked by a request in progress stays."""
        for mid in list(self._resident):
            if len(self._resident) <= self.max_resident:
                return
            lk = self._locks.get(mid)
            if lk is not None and lk.acquire(blocking=False):
                try:
                    del self._resident[mid]
                    self._stats.pop(mid, None)
                finally:
                    lk.release()

    def discard(self, mid: str) -> None:
        """Forget the resident session of ``mid`` (after a failed update: the committed state reloads)."""
        with self._rlock:
            self._resident.pop(mid, None)
            self._stats.pop(mid, None)

    def resident(self) -> dict:
        with self._rlock:
            return {mid: s for mid, (s, _) in self._resident.items()}

    def resident_stats(self) -> dict:
        """Memory stats of each resident session as of its last load or commit (reads no session: never waits)."""
        with self._rlock:
            return dict(self._stats)

    # ------------------------------------------------------------------ durable writes
    def commit(self, mid: str, session) -> dict:
        """Make ``session``'s memory the durable state of ``mid`` (caller holds ``lock(mid)``). Returns the row."""
        old = self._row(mid)
        version = 1 if old is None else old["version"] + 1
        name = f"{file_stem(mid)}-{version}.safetensors"
        path = session.save_memory(self.snapshots / name)  # temp + fsync + rename + fsync dir
        size = os.path.getsize(path)
        updates = (0 if old is None else old["updates"]) + 1
        now = time.time()
        try:
            with self._dblock:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("INSERT INTO memories (id, version, file, bytes, updates, last_use) VALUES (?, ?, ?, ?, ?, ?) "
                                 "ON CONFLICT(id) DO UPDATE SET version = excluded.version, file = excluded.file, "
                                 "bytes = excluded.bytes, updates = excluded.updates, last_use = excluded.last_use",
                                 (mid, version, name, size, updates, now))
                self._db.execute("COMMIT")
        except BaseException:
            with self._dblock:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            # the new file stays: a COMMIT that raised may still be on disk, and then its row names this file;
            # if it is not, the file is an orphan that the next start removes
            raise
        if old is not None and old["file"] != name:
            (self.snapshots / old["file"]).unlink(missing_ok=True)
        stats = session.memory
        with self._rlock:
            self._resident[mid] = (session, (version, now))
            self._stats[mid] = stats
            self._resident.move_to_end(mid)
            self._evict()
        return {"id": mid, "version": version, "file": name, "bytes": size, "updates": updates, "last_use": now}

    def delete(self, mid: str) -> bool:
        """Forget ``mid`` (caller holds ``lock(mid)``): its row and file go, the next use starts from the
        initial memory. Returns whether it existed."""
        row = self._row(mid)
        self.discard(mid)
        if row is None:
            return False
        with self._dblock:
            self._db.execute("DELETE FROM memories WHERE id = ?", (mid,))
        (self.snapshots / row["file"]).unlink(missing_ok=True)
        return True

    def snapshot_file(self, mid: str) -> Path | None:
        row = self._row(mid)
        return None if row is None else self.snapshots / row["file"]

    def info(self, mid: str) -> dict | None:
        return self._row(mid)

    def upload(self, mid: str, data: bytes) -> dict:
        """Replace ``mid``'s memory by an uploaded snapshot (caller holds ``lock(mid)``): written to ``tmp/``,
        validated and loaded into a fresh session exactly as ``Session.load_memory`` does (a bad file raises
        ``SnapshotError`` and changes nothing), then committed."""
        fd_path = self.tmp / f"{file_stem(mid)}-{os.getpid()}-{threading.get_ident()}.upload"
        try:
            fd_path.write_bytes(data)
            s = self.engine.session(seed=self.seed)
            s.load_memory(fd_path)
        finally:
            fd_path.unlink(missing_ok=True)
        self.discard(mid)
        return self.commit(mid, s)

    def close(self) -> None:
        with self._dblock:
            self._db.close()
        if self._store_fd is not None:
            os.close(self._store_fd)  # releases the shared store lock
            self._store_fd = None
