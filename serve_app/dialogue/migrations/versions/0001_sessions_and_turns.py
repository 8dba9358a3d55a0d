"""Sessions (conversations) and their turns, archived from Redis.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "chatserve_sessions",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("meta", JSONB, nullable=False),
        sa.Column("pending", JSONB, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("deleted_at", sa.Double, nullable=True),
    )
    op.create_index("chatserve_sessions_owner", "chatserve_sessions", ["owner", "updated_at"])
    op.create_index("chatserve_sessions_updated_at", "chatserve_sessions", ["updated_at"])
    op.create_table(
        "chatserve_turns",
        sa.Column("session_id", sa.Text, sa.ForeignKey("chatserve_sessions.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("idx", sa.Integer, primary_key=True),
        sa.Column("turn", JSONB, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("chatserve_turns")
    op.drop_table("chatserve_sessions")
