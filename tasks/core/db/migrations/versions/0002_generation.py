"""Schema changes owned by generation (tasks/generate).

Adds an index on conversations (batch_id, item_index): generation shards select, resume and
deduplicate item ranges of a batch by these two columns.

Revision ID: 0002
Revises: 0001
"""

from alembic import op
import sqlalchemy as sa  # noqa: F401

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_conversations_batch_item", "conversations", ["batch_id", "item_index"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_conversations_batch_item", table_name="conversations")
