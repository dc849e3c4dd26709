"""The job store: SQLite records and result files in a data dir (real files, real SQLite)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from gateway.errors import ResultGone, StoreFull, StoreUnavailable
from gateway.jobstore import (
    _MIGRATIONS,
    SCHEMA_VERSION,
    JobRecord,
    open_job_store,
    valid_job_id,
)
from sdcn_p2p.errors import ConfigError

PNG = b"\x89PNG\r\n\x1a\n" + b"x" * 100


def record(job_id: str, *, created_at: float = 1000.0, **fields: object) -> JobRecord:
    values: dict = {
        "id": job_id,
        "kind": "txt2img",
        "mode": "async",
        "api": "sdcn",
        "client": "127.0.0.1",
        "parts": [{"model": "card", "prompt": "a cat", "seed": 7, "loras": [["ink", 0.5]]}],
        "has_init": False,
        "cost": 1.5,
        "created_at": created_at,
    }
    values.update(fields)
    return JobRecord(**values)


def ident(n: int) -> str:
    return f"job{n:020d}"


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


async def test_a_new_store_has_the_current_schema_in_wal_mode(tmp_path: Path) -> None:
    async with open_job_store(tmp_path) as store:
        assert store.unfinished == [] and store.result_bytes == 0
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert set(names(tmp_path)) >= {"jobs.db", "results", "inputs", "lock"}


async def test_a_version_2_store_gains_the_verify_column_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    with sqlite3.connect(tmp_path / "jobs.db") as db:  # as the first job service left it
        db.executescript(_MIGRATIONS[0])
        db.executescript(_MIGRATIONS[1])
        db.execute(
            "INSERT INTO jobs (id, kind, mode, api, client, status, parts, has_init, cost, "
            "created_at) VALUES (?, 'txt2img', 'async', 'sdcn', 'x', 'queued', '[]', 0, 1, 5)",
            (ident(1),),
        )
        db.execute("PRAGMA user_version = 2")
    db.close()
    async with open_job_store(tmp_path) as store:
        old = await store.get(ident(1))
        assert old is not None and old.verify is False
        await store.add(record(ident(2), verify=True))
        new = await store.get(ident(2))
        assert new is not None and new.verify is True
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    db.close()


async def test_what_providers_ran_is_kept_across_a_restart(tmp_path: Path) -> None:
    async with open_job_store(tmp_path) as store:
        assert store.contributions == {}
        store.contribute_nowait("12D3KooWprovider", 5.5, 1000.0)
        store.contribute_nowait("12D3KooWprovider", 0.5, 1010.0)
        store.contribute_nowait("12D3KooWother", 1.0, 900.0)
        await store.wait_flushed()
    async with open_job_store(tmp_path) as store:
        assert store.contributions == {
            "12D3KooWprovider": (6.0, 2, 1010.0),
            "12D3KooWother": (1.0, 1, 900.0),
        }


async def test_a_version_1_store_is_migrated_keeping_its_jobs(tmp_path: Path) -> None:
    from gateway.jobstore import _SCHEMA  # what version 1 was

    with sqlite3.connect(tmp_path / "jobs.db") as db:
        db.executescript(f"BEGIN; {_SCHEMA}; PRAGMA user_version = 1; COMMIT;")
    async with open_job_store(tmp_path) as store:
        await store.add(record(ident(1)))
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        db.execute("PRAGMA user_version = 1")
        db.execute("DROP TABLE contributions")
        db.execute("ALTER TABLE jobs DROP COLUMN verify")  # as version 1 had it
    async with open_job_store(tmp_path) as store:
        assert await store.get(ident(1)) == record(ident(1))
        store.contribute_nowait("12D3KooWprovider", 1.0, 1.0)
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3


async def test_records_round_trip_and_ids_are_checked_before_any_query(tmp_path: Path) -> None:
    async with open_job_store(tmp_path) as store:
        await store.add(record(ident(1)), init_image=b"init")
        got = await store.get(ident(1))
        assert got == record(ident(1))
        assert (tmp_path / "inputs" / ident(1)).read_bytes() == b"init"
        assert await store.init_image(ident(1)) == b"init"
        assert await store.get(ident(2)) is None
        assert await store.get("../../jobs.db") is None
        assert not valid_job_id("../x") and not valid_job_id("short")
        with pytest.raises(ResultGone):
            await store.init_image(ident(2))


async def test_a_result_is_written_as_files_before_its_row_says_done(tmp_path: Path) -> None:
    async with open_job_store(tmp_path) as store:
        await store.add(record(ident(1)))
        await store.finish(ident(1), [PNG, PNG + b"y"], status="done", finished_at=2000.0)
        done = await store.get(ident(1))
        assert done is not None and done.status == "done" and done.images == 2
        assert done.result_bytes == 2 * len(PNG) + 1 == store.result_bytes
        assert await store.images(done) == [PNG, PNG + b"y"]
        (tmp_path / "results" / f"{ident(1)}.1.png").unlink()  # lost behind our back
        with pytest.raises(ResultGone, match="lost"):
            await store.images(done)


async def test_one_failing_write_in_a_batch_leaves_the_others(tmp_path: Path) -> None:
    async with open_job_store(tmp_path) as store:
        await store.add(record(ident(1)))
        store.add_nowait(record(ident(1), client="again"))  # the id is taken: it fails
        store.add_nowait(record(ident(2)))
        await store.add(record(ident(3)))  # written in the same batch, or after it
        assert [await store.get(ident(n)) is not None for n in (1, 2, 3)] == [True] * 3
        assert (await store.get(ident(1))).client == "127.0.0.1"  # type: ignore[union-attr]
        with pytest.raises(StoreUnavailable, match="UNIQUE"):
            await store.add(record(ident(2)))


async def test_a_store_without_free_space_refuses_new_jobs(tmp_path: Path) -> None:
    async with open_job_store(tmp_path, min_free_mb=2**40) as store:
        with pytest.raises(StoreFull, match="disk is full"):
            await store.add(record(ident(1)), init_image=b"init")
        assert await store.get(ident(1)) is None
        assert names(tmp_path / "inputs") == []


async def test_results_expire_shrink_and_are_forgotten(tmp_path: Path) -> None:
    async with open_job_store(tmp_path) as store:
        for n in range(4):
            await store.add(record(ident(n)), init_image=b"init")
            await store.finish(ident(n), [PNG], status="done", finished_at=2000.0 + n)
        assert store.result_bytes == 4 * len(PNG)
        assert await store.expire(2001.0) == 1  # only the first finished before that
        assert await store.shrink(2 * len(PNG)) == 1  # then the oldest of the rest
        assert store.result_bytes == 2 * len(PNG)
        assert [(await store.get(ident(n))).gone is None for n in range(4)] == [  # type: ignore[union-attr]
            False,
            False,
            True,
            True,
        ]
        assert names(tmp_path / "results") == [
            f"{ident(2)}.0.png",
            f"{ident(3)}.0.png",
        ]
        assert names(tmp_path / "inputs") == [ident(2), ident(3)]
        assert await store.delete_result(ident(3), "deleted by DELETE")
        assert not await store.delete_result(ident(3), "deleted by DELETE")
        assert await store.forget(2002.5) == 2  # rows gone before then
        assert await store.get(ident(0)) is None and await store.get(ident(3)) is not None


async def test_opening_resumes_unfinished_rows_and_drops_orphan_files(tmp_path: Path) -> None:
    async with open_job_store(tmp_path) as store:
        await store.add(record(ident(2), created_at=20.0))
        await store.add(record(ident(1), created_at=10.0))
        await store.add(record(ident(3), created_at=30.0))
        await store.finish(ident(3), [PNG], status="done", finished_at=40.0)
    for name in (f"{ident(9)}.0.png", f"{ident(3)}.1.png.part"):
        (tmp_path / "results" / name).write_bytes(PNG)
    (tmp_path / "inputs" / ident(9)).write_bytes(b"init")
    async with open_job_store(tmp_path) as store:
        assert [r.id for r in store.unfinished] == [ident(1), ident(2)]
        assert store.result_bytes == len(PNG)
    assert names(tmp_path / "results") == [f"{ident(3)}.0.png"]
    assert names(tmp_path / "inputs") == []


async def test_queued_writes_are_flushed_on_close(tmp_path: Path) -> None:
    async with open_job_store(tmp_path) as store:
        for n in range(20):
            store.add_nowait(record(ident(n)))
    async with open_job_store(tmp_path) as store:
        assert len(store.unfinished) == 20


async def test_a_temporary_store_is_deleted_on_close() -> None:
    async with open_job_store(None) as store:
        root = store.root
        await store.add(record(ident(1)))
        assert root.is_dir()
    assert not root.exists()


async def test_a_second_store_on_the_same_dir_is_refused(tmp_path: Path) -> None:
    async with open_job_store(tmp_path):
        with pytest.raises(ConfigError, match="in use by another gateway"):
            async with open_job_store(tmp_path):
                pass
    async with open_job_store(tmp_path):  # free again
        pass


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    tmp_path.chmod(0o500)
    yield tmp_path
    tmp_path.chmod(0o700)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
async def test_an_unwritable_data_dir_is_a_config_error(read_only: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be used"):
        async with open_job_store(read_only / "data"):
            pass


async def test_a_data_dir_under_a_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot be used"):
        async with open_job_store(tmp_path / "file" / "data"):
            pass


async def test_a_truncated_database_is_a_config_error(tmp_path: Path) -> None:
    async with open_job_store(tmp_path) as store:
        long = [{"model": "card", "prompt": "p" * 4000, "seed": 7, "loras": []}]
        for n in range(50):
            await store.add(record(ident(n), parts=long))
    data = (tmp_path / "jobs.db").read_bytes()
    (tmp_path / "jobs.db").write_bytes(data[: len(data) // 2] + b"\x00" * 100)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"jobs.db{suffix}").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match=r"jobs\.db"):
        async with open_job_store(tmp_path):
            await trio.lowlevel.checkpoint()
