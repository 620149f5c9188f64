"""retention: a partial index on the interactions whose text the retention purge has yet to wipe

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-09 10:20:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # `tuneloop retention` selects `created_at < cutoff AND text_purged_at IS NULL AND erased_at
    # IS NULL`: on ix_interactions_created every nightly run walks past all the rows purged or
    # erased before; this index holds only the rows still to purge, so it stays small and the
    # predicate needs no filter.
    op.create_index('ix_interactions_retention_pending', 'interactions', ['created_at'],
                    unique=False,
                    postgresql_where=sa.text('text_purged_at IS NULL AND erased_at IS NULL'))


def downgrade() -> None:
    op.drop_index('ix_interactions_retention_pending', table_name='interactions')
