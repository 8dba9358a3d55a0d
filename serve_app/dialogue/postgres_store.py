"""The PostgreSQL session store: the durable, cold tier behind Redis (``cold_store: postgres``).

SQLAlchemy 2 Core on asyncpg: typed tables, a connection pool, and SQL that reads as SQL. The schema
is versioned with Alembic (``migrations/``); :func:`migrate` brings an empty or older database to the
newest revision under an advisory lock, so replicas that start together do not race.

Tables: ``chatserve_sessions`` (one row per session: ``owner``, ``meta`` = the session's JSON
without turns, pending items, ``updated_at`` and ``revision``; ``pending`` items; ``updated_at``;
``revision``; ``deleted_at``) and ``chatserve_turns`` (``session_id``, ``idx``, the Turn JSON).

It is a whole :class:`~serve_app.dialogue.store.SessionStore` (appends lock the session's row, so
concurrent appends keep their order), which is how the store contract tests it. The tiered store
uses three more operations: :meth:`put` (archive a copy; a copy never replaces a newer revision,
and never brings back a deleted session: deleting leaves a tombstone, ``deleted_at``, until
:meth:`purge` removes it with the expired sessions), :meth:`peek` and :meth:`is_deleted`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ..errors import StoreUnavailableError
from ..schemas import Message, Session, Turn

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "chatserve_schema_version"
MIGRATION_LOCK = 0x63686174  # pg_advisory_xact_lock key ("chat")
TOMBSTONE_KEEP_S = 3600.0  # longer than any archive in flight
CONNECT_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 10.0

metadata = sa.MetaData()
sessions = sa.Table(
    "chatserve_sessions", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("meta", JSONB, nullable=False),
    sa.Column("pending", JSONB, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("revision", sa.BigInteger, nullable=False),
    sa.Column("deleted_at", sa.Double, nullable=True),
)
turns = sa.Table(
    "chatserve_turns", metadata,
    sa.Column("session_id", sa.Text, sa.ForeignKey("chatserve_sessions.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True),
    sa.Column("turn", JSONB, nullable=False),
)
META_EXCLUDE = {"turns", "pending", "updated_at", "revision"}


def async_url(url: str) -> sa.URL:
    """``postgresql://...`` (libpq style) as the asyncpg driver's URL."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"postgres_url must be a postgresql:// URL, got {parsed.render_as_string()!r}")
    return parsed.set(drivername="postgresql+asyncpg")


def connect(url: str) -> AsyncEngine:
    return create_async_engine(async_url(url), pool_size=5, max_overflow=10, pool_pre_ping=True,
                               connect_args={"timeout": CONNECT_TIMEOUT_S, "command_timeout": COMMAND_TIMEOUT_S})


async def migrate(engine: AsyncEngine) -> str:
    """Upgrade the schema to the newest revision; returns it."""
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))

    def upgrade(connection) -> None:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async with engine.begin() as conn:
        await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        await conn.run_sync(upgrade)
    return ScriptDirectory.from_config(config).get_current_head()


class PostgresSessionStore:
    def __init__(self, engine: AsyncEngine, ttl_s: float):
        self.engine = engine
        self.ttl_s = ttl_s

    @classmethod
    def from_url(cls, url: str, ttl_s: float) -> PostgresSessionStore:
        return cls(connect(url), ttl_s)

    async def open(self) -> None:
        async with self._reachable():
            await migrate(self.engine)

    async def close(self) -> None:
        await self.engine.dispose()

    @contextlib.asynccontextmanager
    async def _reachable(self) -> AsyncIterator[None]:
        try:
            yield
        except (sa.exc.OperationalError, sa.exc.InterfaceError, OSError, TimeoutError) as e:
            where = self.engine.url.render_as_string(hide_password=True)
            raise StoreUnavailableError(f"session store: cannot reach PostgreSQL at {where}: {e}") from e

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        async with self._reachable(), self.engine.begin() as conn:
            yield conn

    # -- rows <-> sessions -------------------------------------------------------------------------------
    def _live(self, now: float):
        return sa.and_(sessions.c.deleted_at.is_(None), sessions.c.updated_at > now - self.ttl_s)

    @staticmethod
    def _row(session: Session) -> dict:
        return {"id": session.id, "owner": session.owner, "meta": session.model_dump(mode="json", exclude=META_EXCLUDE),
                "pending": [m.model_dump(mode="json") for m in session.pending], "updated_at": session.updated_at,
                "revision": session.revision, "deleted_at": None}

    @staticmethod
    async def _load(conn: AsyncConnection, rows) -> list[Session]:
        rows = list(rows)
        found: dict[str, list] = {row.id: [] for row in rows}
        if found:
            query = sa.select(turns.c.session_id, turns.c.turn).where(turns.c.session_id.in_(list(found)))
            for session_id, turn in await conn.execute(query.order_by(turns.c.session_id, turns.c.idx)):
                found[session_id].append(Turn.model_validate(turn))
        return [Session.model_validate({**row.meta, "updated_at": row.updated_at, "revision": row.revision,
                                        "pending": row.pending, "turns": found[row.id]}) for row in rows]

    @staticmethod
    async def _serialize(conn: AsyncConnection, session_id: str) -> None:
        """Writers that may create the session's row (create, put, delete) take turns on it, also
        while the row does not exist yet (a row lock cannot cover a row about to be inserted)."""
        await conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:id, 0))"), {"id": session_id})

    async def _locked(self, conn: AsyncConnection, session_id: str):
        """The live row of the session, locked for this transaction (None: no such session)."""
        query = sa.select(sessions).where(sessions.c.id == session_id, self._live(time.time())).with_for_update()
        return (await conn.execute(query)).first()

    async def _write_turns(self, conn: AsyncConnection, session: Session) -> None:
        await conn.execute(sa.delete(turns).where(turns.c.session_id == session.id))
        if session.turns:
            await conn.execute(sa.insert(turns), [{"session_id": session.id, "idx": i, "turn": t.model_dump(mode="json")}
                                                  for i, t in enumerate(session.turns)])

    async def _touched(self, conn: AsyncConnection, session_id: str, write: bool, **values) -> Session:
        update = sa.update(sessions).where(sessions.c.id == session_id).values(updated_at=time.time(), **values)
        if write:
            update = update.values(revision=sessions.c.revision + 1)
        (session,) = await self._load(conn, await conn.execute(update.returning(sessions)))
        return session

    # -- SessionStore --------------------------------------------------------------------------------------
    async def create(self, session: Session) -> None:
        row = self._row(session)
        async with self._transaction() as conn:
            await self._serialize(conn, session.id)
            await conn.execute(insert(sessions).values(row).on_conflict_do_update(
                index_elements=[sessions.c.id], set_={k: v for k, v in row.items() if k != "id"}))
            await self._write_turns(conn, session)

    async def get(self, session_id: str) -> Session | None:
        async with self._transaction() as conn:
            if await self._locked(conn, session_id) is None:
                return None
            return await self._touched(conn, session_id, write=False)

    async def delete(self, session_id: str) -> bool:
        """Leaves a tombstone, so no archive in flight can bring the session back."""
        now = time.time()
        tombstone = {"owner": "", "meta": {}, "pending": [], "updated_at": now, "revision": 0, "deleted_at": now}
        async with self._transaction() as conn:
            await self._serialize(conn, session_id)
            live = await self._locked(conn, session_id) is not None
            # Also when there is no row yet: a copy of the session may be on its way here.
            await conn.execute(insert(sessions).values(id=session_id, **tombstone).on_conflict_do_update(
                index_elements=[sessions.c.id], set_=tombstone, where=sessions.c.deleted_at.is_(None)))
            await conn.execute(sa.delete(turns).where(turns.c.session_id == session_id))
        return live

    async def append_turn(self, session_id: str, turn: Turn) -> Session | None:
        async with self._transaction() as conn:
            row = await self._locked(conn, session_id)
            if row is None:
                return None
            count = await conn.scalar(sa.select(sa.func.count()).select_from(turns).where(turns.c.session_id == session_id))
            await conn.execute(sa.insert(turns).values(session_id=session_id, idx=count, turn=turn.model_dump(mode="json")))
            consumed = {m.id for m in turn.input}
            return await self._touched(conn, session_id, write=True,
                                       pending=[m for m in row.pending if m["id"] not in consumed])

    async def add_pending(self, session_id: str, items: list[Message]) -> Session | None:
        async with self._transaction() as conn:
            row = await self._locked(conn, session_id)
            if row is None:
                return None
            pending = row.pending + [m.model_dump(mode="json") for m in items]
            return await self._touched(conn, session_id, write=True, pending=pending)

    async def replace(self, session: Session) -> Session | None:
        row = self._row(session)
        async with self._transaction() as conn:
            stored = await self._locked(conn, session.id)
            if stored is None or stored.revision != session.revision:
                return None
            await self._write_turns(conn, session)
            return await self._touched(conn, session.id, write=True, owner=row["owner"], meta=row["meta"],
                                       pending=row["pending"])

    async def list_for_owner(self, owner: str) -> list[Session]:
        query = (sa.select(sessions).where(sessions.c.owner == owner, self._live(time.time()))
                 .order_by(sessions.c.updated_at.desc()))
        async with self._reachable(), self.engine.connect() as conn:
            return await self._load(conn, await conn.execute(query))

    async def count_for_owner(self, owner: str) -> int:
        query = sa.select(sa.func.count()).select_from(sessions).where(sessions.c.owner == owner,
                                                                        self._live(time.time()))
        async with self._reachable(), self.engine.connect() as conn:
            return (await conn.execute(query)).scalar_one()

    # -- for the tiered store ------------------------------------------------------------------------------
    async def put(self, session: Session) -> bool:
        """Archive a copy of ``session`` as it is (its ``updated_at`` and ``revision``) unless the
        stored copy is newer or the session was deleted; True if written."""
        row = self._row(session)
        stored = sessions.c
        upsert = insert(sessions).values(row).on_conflict_do_update(
            index_elements=[stored.id], set_={k: v for k, v in row.items() if k != "id"},
            where=sa.and_(stored.deleted_at.is_(None), stored.revision <= session.revision))
        async with self._transaction() as conn:
            await self._serialize(conn, session.id)
            if (await conn.execute(upsert.returning(stored.id))).first() is None:
                return False
            await self._write_turns(conn, session)
        return True

    async def peek(self, session_id: str) -> Session | None:
        """The live session as archived, without counting as activity."""
        query = sa.select(sessions).where(sessions.c.id == session_id, self._live(time.time()))
        async with self._reachable(), self.engine.connect() as conn:
            found = await self._load(conn, await conn.execute(query))
        return found[0] if found else None

    async def is_deleted(self, session_id: str) -> bool:
        query = sa.select(sessions.c.deleted_at).where(sessions.c.id == session_id)
        async with self._reachable(), self.engine.connect() as conn:
            return (await conn.scalar(query)) is not None

    async def purge(self) -> int:
        """Remove expired sessions and old tombstones; returns how many."""
        now = time.time()
        gone = sa.or_(sessions.c.deleted_at < now - TOMBSTONE_KEEP_S,
                      sa.and_(sessions.c.deleted_at.is_(None), sessions.c.updated_at <= now - self.ttl_s))
        async with self._transaction() as conn:
            return (await conn.execute(sa.delete(sessions).where(gone))).rowcount


if __name__ == "__main__":  # python -m serve_app.dialogue.postgres_store postgresql://user@host/db
    import asyncio

    async def _main(url: str) -> None:
        engine = connect(url)
        try:
            print(f"{async_url(url).render_as_string(hide_password=True)}: schema at revision {await migrate(engine)}")
        finally:
            await engine.dispose()

    asyncio.run(_main(sys.argv[1]))
