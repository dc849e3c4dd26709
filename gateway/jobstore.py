"""The job service's storage: job records in SQLite, result PNGs as files, in one data dir.

::

    DATA_DIR/
        jobs.db (-wal, -shm)   one row per job, one per provider that ran jobs (its work for
                               this gateway); the schema's version is PRAGMA user_version
        results/ID.N.png       image N of job ID's result
        inputs/ID              the init image of an img2img job, kept as long as its result
        lock                   held (flock) while a gateway uses the dir

SQLite runs in WAL mode with ``synchronous=NORMAL``: a committed row survives the process
being killed (SIGKILL), though not necessarily a power cut. Every call on the connection runs
in a worker thread, one at a time (a CapacityLimiter of 1), so the trio loop never waits on
the disk. Writes are queued and run in batches, one transaction each (group commit), every
write in its own savepoint so that one failing does not undo the others. A write is awaited
where the caller must know it is durable (an accepted async job, its result) and queued
without waiting otherwise (the record of a sync job).

A result's files are written before its row says "done", so a done row has its files unless
they were lost since (then its GET is 410). Files no row claims are deleted at start.

The schema is versioned (``PRAGMA user_version``): a later version adds a migration step to
`_MIGRATIONS` (version 2 added ``contributions``: each provider's work for this gateway, which
earns its owner's key a bigger share). Each row keeps the client and the provider, the cost
in megapixel-steps, and the request itself (re-running a job after a restart, or on another
provider for a spot check).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import trio

from gateway.errors import ResultGone, StoreError, StoreFull, StoreUnavailable
from sdcn_p2p._util import open_service_nursery
from sdcn_p2p.errors import ConfigError

try:  # advisory locks exist on Unix only; elsewhere two gateways must not share a dir
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "SCHEMA_VERSION",
    "JobRecord",
    "JobStore",
    "json_safe",
    "open_job_store",
    "valid_job_id",
]

log = logging.getLogger(__name__)

#: The version of the schema this code writes (``PRAGMA user_version``).
SCHEMA_VERSION = 3
_DB = "jobs.db"
# Job ids are ours (URL-safe base64); anything else never reaches a query or a path.
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
#: Bytes of queued writes beyond which `wait_writable` makes callers wait.
_BACKLOG_BYTES = 64 * 2**20
# Seconds between two warnings about writes that failed in the background.
_WARN_EVERY = 60.0
_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY NOT NULL,
    kind TEXT NOT NULL,             -- txt2img | img2img
    mode TEXT NOT NULL,             -- async | sync
    api TEXT NOT NULL,              -- sdcn | a1111: the API it came through
    client TEXT NOT NULL,           -- who asked: ip:ADDRESS (IPv6: its /64) or key:NAME
    task_id TEXT,                   -- the A1111 client's force_task_id
    status TEXT NOT NULL,           -- queued | running | done | failed | cancelled
    parts TEXT NOT NULL,            -- JSON: each dispatched job's fields, init image apart
    has_init INTEGER NOT NULL,      -- 1: its init image is inputs/ID
    cost REAL NOT NULL,             -- megapixel-steps of all parts
    created_at REAL NOT NULL,       -- Unix seconds
    started_at REAL,
    finished_at REAL,
    provider TEXT,                  -- peer id of the provider that ran it (or last tried)
    attempts INTEGER NOT NULL DEFAULT 0,
    runs INTEGER NOT NULL DEFAULT 1,  -- 1 + restarts that found it unfinished
    info TEXT,                      -- JSON: the provider's info, when done
    images INTEGER NOT NULL DEFAULT 0,
    result_bytes INTEGER NOT NULL DEFAULT 0,
    error_kind TEXT,                -- the gateway.errors type it failed with
    error_msg TEXT,
    last_event TEXT,                -- the id of its terminal event
    gone TEXT                       -- why its result was deleted; NULL while kept
);
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX jobs_unfinished ON jobs (created_at) WHERE finished_at IS NULL;
"""
_CONTRIBUTIONS = """
CREATE TABLE contributions (
    provider TEXT PRIMARY KEY NOT NULL,  -- peer id
    megapixel_steps REAL NOT NULL,       -- work of the jobs it returned images for
    jobs INTEGER NOT NULL,
    last_at REAL NOT NULL                -- Unix seconds of the latest
)
"""
#: Migrations from version N to N + 1, by N; version 0 is a new, empty file.
_MIGRATIONS: dict[int, str] = {
    0: _SCHEMA,
    1: _CONTRIBUTIONS,
    # 2: the client asked that a second provider agree before the answer (gateway.spotcheck)
    2: "ALTER TABLE jobs ADD COLUMN verify INTEGER NOT NULL DEFAULT 0",
}
_UNFINISHED = ("queued", "running")


def valid_job_id(text: str) -> bool:
    """Whether `text` has the form of a job id (so that it is safe in a path)."""
    return _JOB_ID.fullmatch(text) is not None


def json_safe(value: Any) -> Any:
    """`value` with what JSON cannot hold (bytes, NaN, non-string keys) replaced or dropped."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items() if isinstance(k, str)}
    return None


@dataclass(slots=True)
class JobRecord:
    """One row of the store (see the schema above for each field)."""

    id: str
    kind: str
    mode: str
    api: str
    client: str
    parts: list[dict[str, Any]]
    has_init: bool
    cost: float
    created_at: float
    task_id: str | None = None
    status: str = "queued"
    started_at: float | None = None
    finished_at: float | None = None
    provider: str | None = None
    attempts: int = 0
    runs: int = 1
    info: dict[str, Any] | None = None
    images: int = 0
    result_bytes: int = 0
    error_kind: str | None = None
    error_msg: str | None = None
    last_event: str | None = None
    gone: str | None = None
    verify: bool = False  # a second provider must agree before the answer (schema 3)


_COLUMNS = tuple(f.name for f in fields(JobRecord))
_JSON_COLUMNS = {"parts", "info"}


def _to_row(record: JobRecord) -> tuple[Any, ...]:
    values = []
    for name in _COLUMNS:
        value = getattr(record, name)
        if name in _JSON_COLUMNS and value is not None:
            value = json.dumps(json_safe(value), separators=(",", ":"))
        values.append(value)
    return tuple(values)


def _from_row(row: Sequence[Any]) -> JobRecord:
    values = dict(zip(_COLUMNS, row, strict=True))
    for name in _JSON_COLUMNS:
        if values[name] is not None:
            values[name] = json.loads(values[name])
    values["has_init"] = bool(values["has_init"])
    values["verify"] = bool(values["verify"])
    return JobRecord(**values)


@dataclass(slots=True)
class _Write:
    fn: Callable[[sqlite3.Connection], Any]
    done: trio.Event | None  # None: nobody waits for it
    size: int = 0  # bytes it holds, for back-pressure
    then: Callable[[], None] | None = None  # called in trio once it ran, whichever way
    result: Any = None
    error: BaseException | None = field(default=None, repr=False)


class JobStore:
    """The records and results of a gateway's jobs (see the module docstring).

    Made by `open_job_store`; methods that wait run their work in the store's thread. Writes
    raise StoreFull or StoreUnavailable (`gateway.errors`); the ``_nowait`` ones log those
    instead.
    """

    def __init__(self, root: Path, connection: sqlite3.Connection, min_free: int) -> None:
        self.root = root
        self._db = connection
        self._min_free = min_free
        self._results = root / "results"
        self._inputs = root / "inputs"
        self._limiter = trio.CapacityLimiter(1)
        self._queue: list[_Write] = []
        self._queued = trio.Event()
        self._backlog = 0  # bytes held by queued writes
        self._drained = trio.Event()
        self._closed = False
        self._warned_at = -math.inf
        #: Bytes of the results kept now (rows not `gone`).
        self.result_bytes = 0
        #: The unfinished rows found at open, oldest first, for the job service to resume.
        self.unfinished: list[JobRecord] = []
        #: What each provider ran for this gateway, found at open: peer id ->
        #: (megapixel-steps, jobs, Unix seconds of the latest).
        self.contributions: dict[str, tuple[float, int, float]] = {}

    # --- reading -------------------------------------------------------------------------------

    async def get(self, job_id: str) -> JobRecord | None:
        """The record of `job_id`, or None."""
        if not valid_job_id(job_id):
            return None
        return await self._read(lambda db: self._select(db, job_id))

    @staticmethod
    def _select(db: sqlite3.Connection, job_id: str) -> JobRecord | None:
        row = db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        return _from_row(row) if row is not None else None

    async def images(self, record: JobRecord) -> list[bytes]:
        """The result PNGs of a done job; ResultGone if its files are missing."""

        def read() -> list[bytes]:
            try:
                return [self._result_path(record.id, n).read_bytes() for n in range(record.images)]
            except FileNotFoundError:
                raise ResultGone(
                    f"the result of job {record.id} was lost from the data dir"
                ) from None

        return await trio.to_thread.run_sync(read)

    async def init_image(self, job_id: str) -> bytes:
        """The init image kept for `job_id`; ResultGone if it is missing."""

        def read() -> bytes:
            try:
                return (self._inputs / job_id).read_bytes()
            except FileNotFoundError:
                raise ResultGone(
                    f"the init image of job {job_id} was lost from the data dir"
                ) from None

        return await trio.to_thread.run_sync(read)

    # --- writing -------------------------------------------------------------------------------

    async def add(self, record: JobRecord, init_image: bytes | None = None) -> None:
        """Store a new job (and its init image) durably, first making sure the disk has room.

        Raises StoreFull or StoreUnavailable, and then stores nothing.
        """
        await self._write(self._adder(record, init_image, check_space=True), len(init_image or b""))

    def add_nowait(self, record: JobRecord, init_image: bytes | None = None) -> None:
        """Queue a new job's record; a failure is logged."""
        self._write_nowait(
            self._adder(record, init_image, check_space=False), len(init_image or b"")
        )

    def _adder(
        self, record: JobRecord, init_image: bytes | None, *, check_space: bool
    ) -> Callable[[sqlite3.Connection], None]:
        def add(db: sqlite3.Connection) -> None:
            if check_space:
                self._check_space()
            if init_image is not None:
                _write_file(self._inputs / record.id, init_image)
            try:
                placeholders = ", ".join("?" * len(_COLUMNS))
                db.execute(
                    f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({placeholders})",
                    _to_row(record),
                )
            except BaseException:
                if init_image is not None:
                    (self._inputs / record.id).unlink(missing_ok=True)
                raise

        return add

    def update_nowait(self, job_id: str, **values: Any) -> None:
        """Queue an update of some columns of `job_id`'s row; a failure is logged."""
        self._write_nowait(lambda db: self._update(db, job_id, values))

    def contribute_nowait(self, provider: str, megapixel_steps: float, at: float) -> None:
        """Queue adding a job of `megapixel_steps` that `provider` ran (at Unix time `at`)
        to its row of contributions; a failure is logged."""

        def add(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO contributions VALUES (?, ?, 1, ?) ON CONFLICT (provider) DO UPDATE "
                "SET megapixel_steps = megapixel_steps + excluded.megapixel_steps, "
                "jobs = jobs + 1, last_at = max(last_at, excluded.last_at)",
                (provider, megapixel_steps, at),
            )

        self._write_nowait(add)

    @staticmethod
    def _update(db: sqlite3.Connection, job_id: str, values: dict[str, Any]) -> None:
        row = {}
        for name, value in values.items():
            if name not in _COLUMNS or name == "id":
                raise ValueError(f"no column {name!r}")
            if name in _JSON_COLUMNS and value is not None:
                value = json.dumps(json_safe(value), separators=(",", ":"))
            row[name] = value
        assignments = ", ".join(f"{name} = ?" for name in row)
        db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*row.values(), job_id))

    def restart_nowait(self, now: float) -> None:
        """Queue what a restart does to the jobs left unfinished: async ones are queued for
        another run (``runs`` + 1), sync ones cancelled at `now` (their clients are gone)."""

        def restart(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE jobs SET runs = runs + 1, status = 'queued' "
                "WHERE finished_at IS NULL AND mode = 'async'"
            )
            db.execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?, "
                "last_event = runs || '.1' WHERE finished_at IS NULL AND mode = 'sync'",
                (now,),
            )

        self._write_nowait(restart)

    async def finish(self, job_id: str, images: Sequence[bytes] = (), **values: Any) -> None:
        """Store a job's end: its result PNGs (if any) as files, then its row's `values`
        (status, finished_at, ...). Raises StoreFull or StoreUnavailable; the row is then
        unchanged.
        """
        await self._write(self._finisher(job_id, images, values), sum(map(len, images)))

    def finish_nowait(
        self,
        job_id: str,
        images: Sequence[bytes] = (),
        *,
        then: Callable[[], None] | None = None,
        **values: Any,
    ) -> None:
        """Queue `finish`; `then()` is called once it ran (whichever way). A failure is
        logged, and the result is then marked gone so that its GET says so."""
        size = sum(map(len, images))
        self._write_nowait(self._finisher(job_id, images, values), size, then=then)

    def _finisher(
        self, job_id: str, images: Sequence[bytes], values: dict[str, Any]
    ) -> Callable[[sqlite3.Connection], None]:
        def finish(db: sqlite3.Connection) -> None:
            written = []
            try:
                for index, png in enumerate(images):
                    path = self._result_path(job_id, index)
                    _write_file(path, png)
                    written.append(path)
                size = sum(map(len, images))
                self._update(db, job_id, {**values, "images": len(images), "result_bytes": size})
            except BaseException:
                for path in written:
                    path.unlink(missing_ok=True)
                if images:  # tell GET why there is no result
                    with contextlib.suppress(sqlite3.Error):
                        self._update(db, job_id, {**values, "gone": "not stored: the disk failed"})
                raise
            self.result_bytes += size

        return finish

    async def delete_result(self, job_id: str, why: str) -> bool:
        """Delete a finished job's result files and init image, marking the row `gone`
        with `why`; False if it was gone already (or is unknown or unfinished)."""

        def delete(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT images, result_bytes FROM jobs "
                "WHERE id = ? AND finished_at IS NOT NULL AND gone IS NULL",
                (job_id,),
            ).fetchone()
            if row is None:
                return False
            self._drop(db, [(job_id, row[0], row[1])], why)
            return True

        return await self._write(delete)

    async def expire(self, before: float) -> int:
        """Delete the results (and init images) of jobs that finished before `before` (Unix
        seconds), marking their rows `gone`; returns how many."""

        def expire(db: sqlite3.Connection) -> int:
            rows = db.execute(
                "SELECT id, images, result_bytes FROM jobs WHERE finished_at < ? AND gone IS NULL",
                (before,),
            ).fetchall()
            self._drop(db, rows, "expired: kept for the gateway's job retention only")
            return len(rows)

        return await self._write(expire)

    async def shrink(self, max_bytes: int) -> int:
        """Delete the oldest finished results until those kept fit in `max_bytes`; returns
        how many went."""

        def shrink(db: sqlite3.Connection) -> int:
            dropped = 0
            while self.result_bytes > max_bytes:
                rows = db.execute(
                    "SELECT id, images, result_bytes FROM jobs "
                    "WHERE finished_at IS NOT NULL AND gone IS NULL AND result_bytes > 0 "
                    "ORDER BY finished_at LIMIT 64"
                ).fetchall()
                if not rows:
                    break
                for row in rows:
                    if self.result_bytes <= max_bytes:
                        break
                    self._drop(db, [row], "deleted to make room for newer results")
                    dropped += 1
            return dropped

        return await self._write(shrink)

    async def forget(self, before: float) -> int:
        """Delete the rows of jobs whose results are gone and which finished before
        `before`: their ids are then unknown (404) rather than gone (410)."""
        return await self._write(
            lambda db: (
                db.execute(
                    "DELETE FROM jobs WHERE finished_at < ? AND gone IS NOT NULL", (before,)
                ).rowcount
            )
        )

    def _drop(self, db: sqlite3.Connection, rows: Sequence[Sequence[Any]], why: str) -> None:
        for job_id, images, size in rows:
            db.execute("UPDATE jobs SET gone = ? WHERE id = ?", (why, job_id))
            for index in range(images):
                self._result_path(job_id, index).unlink(missing_ok=True)
            (self._inputs / job_id).unlink(missing_ok=True)
            self.result_bytes -= size

    def _result_path(self, job_id: str, index: int) -> Path:
        return self._results / f"{job_id}.{index}.png"

    def _check_space(self) -> None:
        stats = os.statvfs(self.root)
        free = stats.f_bavail * stats.f_frsize
        if free < self._min_free:
            raise StoreFull(
                f"the gateway's disk is full ({free // 2**20} MiB free, it keeps "
                f"{self._min_free // 2**20} MiB); try again later"
            )

    async def wait_flushed(self) -> None:
        """Wait until every write queued so far has run."""
        await self._write(lambda db: None)

    async def wait_writable(self) -> None:
        """Wait while queued writes hold more than 64 MiB (back-pressure for `_nowait`)."""
        while self._backlog > _BACKLOG_BYTES and not self._closed:
            self._drained = trio.Event() if self._drained.is_set() else self._drained
            await self._drained.wait()

    # --- the thread ------------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        # In line with the writes, so that a read sees every write queued before it.
        return await self._write(fn)

    async def _write(self, fn: Callable[[sqlite3.Connection], _T], size: int = 0) -> Any:
        if self._closed:
            raise StoreUnavailable("the job store is closed")
        write = _Write(fn, trio.Event(), size)
        self._enqueue(write)
        await write.done.wait()  # type: ignore[union-attr]
        if write.error is not None:
            raise write.error
        return write.result

    def _write_nowait(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        size: int = 0,
        then: Callable[[], None] | None = None,
    ) -> None:
        if self._closed:
            log.debug("job store closed: a write is dropped")
            if then is not None:
                then()
            return
        self._enqueue(_Write(fn, None, size, then))

    def _enqueue(self, write: _Write) -> None:
        self._queue.append(write)
        self._backlog += write.size
        self._queued.set()

    async def _run_writes(self) -> None:
        """Apply queued writes in batches until cancelled (then the queue is flushed)."""
        try:
            while True:
                await self._queued.wait()
                await self._flush()
        finally:
            with trio.CancelScope(shield=True):
                self._closed = True
                await self._flush()

    async def _flush(self) -> None:
        self._queued = trio.Event()
        batch, self._queue = self._queue, []
        if not batch:
            return
        try:
            await trio.to_thread.run_sync(self._apply, batch, limiter=self._limiter)
        finally:  # every write hears how it went, whatever happened
            self._backlog -= sum(write.size for write in batch)
            if self._backlog <= _BACKLOG_BYTES:
                self._drained.set()
            for write in batch:
                if write.done is not None:
                    write.done.set()
                else:
                    if write.error is not None:
                        self._warn(write.error)
                    if write.then is not None:
                        write.then()

    def _apply(self, batch: list[_Write]) -> None:
        """One transaction for `batch`, a savepoint per write (in the store's thread).

        A write that fails is rolled back to its savepoint and told why; if the transaction
        itself fails (SQLite may roll back the whole of it on a full disk), every write in
        it is.
        """
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            for write in batch:
                db.execute("SAVEPOINT write")
                try:
                    write.result = write.fn(db)
                except (sqlite3.Error, OSError, StoreError) as exc:
                    write.error = _store_error(exc)
                    db.execute("ROLLBACK TO write")
                db.execute("RELEASE write")
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            for write in batch:
                write.error = write.error or _store_error(exc)
                write.result = None
        if any(write.error is not None for write in batch):  # the count may have run ahead
            with contextlib.suppress(sqlite3.Error):
                self.result_bytes = _kept_bytes(db)

    def _warn(self, error: BaseException) -> None:
        now = trio.current_time()
        if now - self._warned_at >= _WARN_EVERY:
            self._warned_at = now
            log.warning("the job store could not write a job's record or result: %s", error)


def _store_error(exc: BaseException) -> StoreError:
    """What a failed write is to the job service (StoreFull or StoreUnavailable)."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
            return StoreFull("the gateway's job store is full; try again later")
        return StoreUnavailable(f"the gateway cannot store jobs now: {exc}")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StoreFull("the gateway's disk is full; try again later")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return StoreUnavailable(f"the gateway cannot store jobs now: {reason}")


def _write_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole: into a temporary file, then renamed over it."""
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    part.replace(path)


# --- opening -------------------------------------------------------------------------------------


@asynccontextmanager
async def open_job_store(
    data_dir: Path | None, *, min_free_mb: int = 64
) -> AsyncIterator[JobStore]:
    """Open (creating it if need be) the job store in `data_dir`; None makes a temporary
    directory, deleted on exit.

    Raises ConfigError if the dir cannot be created or written, is used by another gateway,
    or holds a store that is corrupt or from a newer version. Queued writes are flushed on
    exit.
    """
    temporary = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="sdcn-jobs-")) if data_dir is None else data_dir
    try:
        store, lock = await trio.to_thread.run_sync(_open, root, min_free_mb * 2**20)
        try:
            async with open_service_nursery() as nursery:
                nursery.start_soon(store._run_writes)
                try:
                    yield store
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_close, store, lock)
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)


def _open(root: Path, min_free: int) -> tuple[JobStore, int | None]:
    where = f"the data dir {root}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for sub in ("results", "inputs"):
            (root / sub).mkdir(exist_ok=True)
        probe = root / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{where} cannot be used: {exc.strerror or exc}") from None
    lock = _lock(root)
    try:
        db = sqlite3.connect(root / _DB, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        _unlock(lock)
        raise ConfigError(f"{where}: cannot open {_DB}: {exc}") from None
    try:
        store = JobStore(root, db, min_free)
        _prepare(db, root)
        store.result_bytes = _kept_bytes(db)
        rows = db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE finished_at IS NULL "
            "ORDER BY created_at, rowid"
        ).fetchall()
        store.unfinished = _decode(rows)
        rows = db.execute("SELECT provider, megapixel_steps, jobs, last_at FROM contributions")
        store.contributions = {row[0]: (row[1], row[2], row[3]) for row in rows}
        _remove_orphans(db, root)
    except sqlite3.DatabaseError as exc:
        db.close()
        _unlock(lock)
        raise ConfigError(f"{where}: {_DB} is not a usable job store ({exc})") from None
    except (ConfigError, OSError, ValueError) as exc:
        db.close()
        _unlock(lock)
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: {_DB} is not a usable job store ({exc})") from None
    return store, lock


def _prepare(db: sqlite3.Connection, root: Path) -> None:
    """Check the file and bring its schema to SCHEMA_VERSION."""
    if db.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
        raise ConfigError(f"the data dir {root}: {_DB} cannot use write-ahead logging")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA busy_timeout = 5000")
    problems = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
    if problems != ["ok"]:
        raise ConfigError(f"the data dir {root}: {_DB} is corrupt ({problems[0][:200]})")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"the data dir {root}: {_DB} has schema version {version}, made by a newer SDCN "
            f"(this one reads up to {SCHEMA_VERSION})"
        )
    if version == 0 and db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
        raise ConfigError(f"the data dir {root}: {_DB} is a database of something else")
    while version < SCHEMA_VERSION:
        db.executescript(
            f"BEGIN; {_MIGRATIONS[version]}; PRAGMA user_version = {version + 1}; COMMIT;"
        )
        version += 1
    columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    if columns != set(_COLUMNS):
        raise ConfigError(f"the data dir {root}: {_DB} has a jobs table of another shape")


def _decode(rows: list[Any]) -> list[JobRecord]:
    """`rows` as records; the collector is off meanwhile (its passes over objects made in
    bulk and kept would be wasted: a third of the time for 10,000 rows)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        return [_from_row(row) for row in rows]
    finally:
        if collecting:
            gc.enable()


def _kept_bytes(db: sqlite3.Connection) -> int:
    return db.execute(
        "SELECT COALESCE(SUM(result_bytes), 0) FROM jobs WHERE gone IS NULL"
    ).fetchone()[0]


def _remove_orphans(db: sqlite3.Connection, root: Path) -> None:
    """Delete result and input files no kept row claims (a crash between writing them and
    the row), and half-written ``.part`` files."""
    kept = {row[0] for row in db.execute("SELECT id FROM jobs WHERE gone IS NULL")}
    for sub in ("results", "inputs"):
        for path in (root / sub).iterdir():
            if path.name.split(".", 1)[0] not in kept or path.name.endswith(".part"):
                path.unlink(missing_ok=True)


def _lock(root: Path) -> int | None:
    if fcntl is None:  # pragma: no cover
        return None
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(f"the data dir {root} is in use by another gateway") from None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing releases the flock


def _close(store: JobStore, lock: int | None) -> None:
    try:
        store._db.close()
    finally:
        _unlock(lock)
