"""Alembic's entry point: runs the migrations on the connection ``postgres_store.migrate`` hands over
(there is no alembic.ini: the database URL is the application's)."""

from alembic import context

from serve_app.dialogue.postgres_store import VERSION_TABLE

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the migrations through serve_app.dialogue.postgres_store.migrate "
                       "(python -m serve_app.dialogue.postgres_store URL)")
context.configure(connection=connection, version_table=VERSION_TABLE, transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
