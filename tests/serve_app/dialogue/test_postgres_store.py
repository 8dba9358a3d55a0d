"""The PostgreSQL tier's own concerns, on a real server: the migrations from an empty database (and
back), and a clear error when the server cannot be reached. (The store contract, run on this store
too, is in ``test_store_contract.py``.)"""

import subprocess
import sys

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from serve_app.dialogue.postgres_store import (
    MIGRATIONS_DIR,
    VERSION_TABLE,
    PostgresSessionStore,
    connect,
    migrate,
)
from serve_app.errors import StoreUnavailableError
from serve_app.schemas import Session

from ...apps import free_port


async def tables(engine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))


async def test_migrations_run_from_an_empty_database_and_back(postgres_db):
    engine = connect(postgres_db)
    try:
        assert await tables(engine) == set()
        head = await migrate(engine)
        assert await tables(engine) == {"chatserve_sessions", "chatserve_turns", VERSION_TABLE}
        async with engine.connect() as conn:
            assert await conn.scalar(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")) == head
        assert await migrate(engine) == head  # again: nothing to do

        store = PostgresSessionStore(engine, ttl_s=60)
        session = Session(owner="alice", title="after the migrations")
        await store.create(session)
        assert (await store.get(session.id)).title == "after the migrations"

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))

        def downgrade(connection) -> None:
            config.attributes["connection"] = connection
            command.downgrade(config, "base")

        async with engine.begin() as conn:
            await conn.run_sync(downgrade)
        assert await tables(engine) == {VERSION_TABLE}
    finally:
        await engine.dispose()


def test_the_migration_command_line(postgres_db):
    done = subprocess.run([sys.executable, "-m", "serve_app.dialogue.postgres_store", postgres_db],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("schema at revision 0001")


async def test_an_unreachable_server_is_a_clear_error():
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"  # nothing listens there
    store = PostgresSessionStore.from_url(url, ttl_s=60)
    try:
        with pytest.raises(StoreUnavailableError, match="cannot reach PostgreSQL at postgresql"):
            await store.get("any")
        with pytest.raises(StoreUnavailableError):
            await store.open()
    finally:
        await store.close()
