"""Versioned schema migrations of the PostgreSQL cold tier (Alembic). ``postgres_store.migrate``
runs them to the newest revision when the dialogue deployment starts (under an advisory lock, so
several replicas may start at once); ``python -m serve_app.dialogue.postgres_store URL`` runs them
by hand. A new revision: ``versions/<NNNN>_<what>.py`` with ``down_revision`` naming the previous one."""
