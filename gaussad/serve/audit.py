"""The audit trail: every decision the service answers, recorded before the answer is sent.

One schema in SQLite (a file in WAL mode, synchronous commits: the default) or PostgreSQL (psycopg 3),
both through SQLAlchemy 2. The schema's version lives in a table of its own; opening a store applies the
migrations it lacks, in one transaction, and refuses a store written by a newer gaussad. Times are UTC.

`AuditWriter` records from one thread and commits whatever decisions arrived meanwhile in one
transaction (group commit): one disk flush serves a whole batch of answers, and no answer goes out before
its commit, so a crash loses no decision that was answered.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Double,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from gaussad.errors import GaussADError

metadata = MetaData()
schema_version = Table("gaussad_audit_version", metadata, Column("version", Integer, nullable=False))
decisions = Table(
    "gaussad_decisions",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("time", DateTime(), nullable=False, index=True),  # UTC
    Column("request_id", String(128), nullable=False, index=True),
    Column("client", String(64)),
    Column("route", String(16), nullable=False),  # "inspect" (v1) or "infer" (v2)
    Column("image_sha256", String(64), nullable=False),
    Column("image_width", Integer, nullable=False),
    Column("image_height", Integer, nullable=False),
    Column("image_bytes", Integer, nullable=False),
    Column("image_kept", Boolean, nullable=False),
    Column("model", String(128), nullable=False, index=True),
    Column("model_sha256", String(64), nullable=False),
    Column("image_threshold", Double, nullable=False),
    Column("pixel_threshold", Double),
    Column("score", Double, nullable=False),
    Column("normalized_score", Double, nullable=False),
    Column("is_anomalous", Boolean, nullable=False),
    Column("latency_ms", Double, nullable=False),
)


def _create_decisions(connection: Connection) -> None:
    """Version 1: the decisions table. A later version appends its own step to MIGRATIONS, written as
    explicit changes (never by editing this one), so every store reaches the same schema."""
    decisions.create(connection)


MIGRATIONS: tuple[Callable[[Connection], None], ...] = (_create_decisions,)
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class AuditRecord:
    """One decision as the audit trail keeps it: a row of `gaussad_decisions`."""

    time: datetime  # UTC
    request_id: str
    client: str | None
    route: str
    image_sha256: str
    image_width: int
    image_height: int
    image_bytes: int
    image_kept: bool
    model: str
    model_sha256: str
    image_threshold: float
    pixel_threshold: float | None
    score: float
    normalized_score: float
    is_anomalous: bool
    latency_ms: float

    def as_row(self) -> dict[str, Any]:
        return asdict(self) | {"time": self.time.astimezone(timezone.utc).replace(tzinfo=None)}


COLUMNS = tuple(f.name for f in fields(AuditRecord))


def audit_url(value: str) -> str:
    """A SQLAlchemy URL for `--audit`: a plain path is a SQLite file; postgresql:// and postgres:// use
    psycopg 3. The folder of a SQLite file must exist; an in-memory database is refused (it is lost)."""
    if "://" not in value:
        path = Path(value).expanduser().absolute()
        if not path.parent.is_dir():
            raise GaussADError(f"--audit {value}: folder {path.parent} does not exist")
        return f"sqlite:///{path}"
    scheme, rest = value.split("://", 1)
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        return f"postgresql+psycopg://{rest}"
    if scheme == "sqlite" and rest.strip("/"):
        return value
    raise GaussADError(
        f"--audit {scheme}://...: expected a SQLite file path, sqlite:///FILE or postgresql://USER@HOST/DB"
    )


def _shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


class AuditStore:
    """An audit database, migrated to this gaussad's schema when opened."""

    def __init__(self, url: str) -> None:
        self.url = audit_url(url)
        try:
            self.engine = _engine(self.url)
            self._migrate()
        except ArgumentError as error:
            raise GaussADError(f"--audit {_shown(self.url)}: {error}") from None
        except SQLAlchemyError as error:
            raise GaussADError(f"audit store {_shown(self.url)}: {_reason(error)}") from None

    def _migrate(self) -> None:
        with self.engine.begin() as connection:
            schema_version.create(connection, checkfirst=True)
            if connection.dialect.name == "postgresql":  # two servers starting at once migrate once
                connection.exec_driver_sql("LOCK TABLE gaussad_audit_version IN EXCLUSIVE MODE")
            version = connection.execute(select(schema_version.c.version)).scalar()
            if version is None:
                connection.execute(insert(schema_version).values(version=0))
                version = 0
            if version > SCHEMA_VERSION:
                raise GaussADError(
                    f"audit store {_shown(self.url)} has schema version {version}, newer than this gaussad's "
                    f"{SCHEMA_VERSION}: upgrade gaussad"
                )
            for step in MIGRATIONS[version:]:
                step(connection)
            connection.execute(update(schema_version).values(version=SCHEMA_VERSION))

    def insert(self, records: list[AuditRecord]) -> None:
        """Commit records in one transaction."""
        with self.engine.begin() as connection:
            connection.execute(insert(decisions), [record.as_row() for record in records])

    def query(
        self,
        since: datetime | None = None,
        model: str | None = None,
        anomalous: bool = False,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Decisions, newest first: since a UTC time, of one model, only the anomalous ones, at most
        `limit`. Times come back timezone-aware (UTC)."""
        statement = select(*(decisions.c[name] for name in COLUMNS)).order_by(decisions.c.id.desc())
        if since is not None:
            statement = statement.where(
                decisions.c.time >= since.astimezone(timezone.utc).replace(tzinfo=None)
            )
        if model is not None:
            statement = statement.where(decisions.c.model == model)
        if anomalous:
            statement = statement.where(decisions.c.is_anomalous.is_(True))
        if limit is not None:
            statement = statement.limit(limit)
        try:
            with self.engine.connect() as connection:
                rows = [dict(row._mapping) for row in connection.execute(statement)]
        except SQLAlchemyError as error:
            raise GaussADError(f"audit store {_shown(self.url)}: {_reason(error)}") from None
        for row in rows:
            row["time"] = row["time"].replace(tzinfo=timezone.utc)
        return rows

    def close(self) -> None:
        self.engine.dispose()


def _engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _connect(connection: Any, _record: Any) -> None:
        # SQLAlchemy issues BEGIN itself (below), so that migrations' DDL is transactional too.
        connection.isolation_level = None
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=30000"):
            connection.execute(f"PRAGMA {pragma}")

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN")

    return engine


def _reason(error: SQLAlchemyError) -> str:
    """The driver's own message, first line: what a user can act on (no SQL, no password)."""
    original = getattr(error, "orig", None) or error
    return str(original).strip().splitlines()[0] if str(original).strip() else type(original).__name__


class AuditWriter:
    """Records decisions from one thread in group commits; `record` returns once the decision is stored."""

    def __init__(self, store: AuditStore, max_group: int = 512) -> None:
        self.store = store
        self._max_group = max_group
        self._queue: queue.SimpleQueue[tuple[AuditRecord, Future] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="gaussad audit", daemon=True)
        self._thread.start()

    async def record(self, record: AuditRecord) -> None:
        """Store one decision; raises `GaussADError` when the store cannot take it."""
        done: Future = Future()
        self._queue.put((record, done))
        await asyncio.wrap_future(done)

    def close(self) -> None:
        """Store what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join()
        self.store.close()

    def _groups(self) -> Iterator[list[tuple[AuditRecord, Future]]]:
        """What arrived while the previous group was committed, one group at a time, until closed."""
        while True:
            first = self._queue.get()
            group = [] if first is None else [first]
            closing = first is None
            while len(group) < self._max_group and not closing:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                closing = item is None
                if item is not None:
                    group.append(item)
            if group:
                yield group
            if closing:
                return

    def _run(self) -> None:
        for group in self._groups():
            try:
                self.store.insert([record for record, _ in group])
            except Exception as error:  # whatever it is, those requests fail and the thread goes on
                reason = _reason(error) if isinstance(error, SQLAlchemyError) else repr(error)
                failure = GaussADError(f"audit store {_shown(self.store.url)}: {reason}")
                for _, done in group:
                    done.set_exception(failure)
                continue
            for _, done in group:
                done.set_result(None)
