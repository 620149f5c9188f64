"""Schema changes owned by curation, gate, exports, reaction signals.

- ix_reactions_signal on reactions(reaction, dwell_ms): reaction-signal datasets and the nightly
  new-signal count select reactions by type (done / dismiss) and dwell window.

The curation tables themselves (datasets, dataset_items, dataset_exclusions) come with 0001.

Revision ID: 0004
Revises: 0003
"""

from alembic import op
import sqlalchemy as sa  # noqa: F401

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_reactions_signal", "reactions", ["reaction", "dwell_ms"])


def downgrade() -> None:
    op.drop_index("ix_reactions_signal", table_name="reactions")
