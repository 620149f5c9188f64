"""Schema changes owned by tagging and judging (tasks/tag/stage.py, tasks/judge/stage.py).

- tagger_versions: template/schema/backend/model behind each tagger version (replay + audit).
- rubric_versions: the rubric content each judgments.rubric_version refers to.
- judgments.attempts / judgments.raw_output: structured-output attempts and the raw reply of
  an ERROR verdict.
- ix_tag_failures_tagger_version: per-tagger failure statistics.

Revision ID: 0003
Revises: 0002
"""

from alembic import op  # noqa: F401
import sqlalchemy as sa  # noqa: F401
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tagger_versions",
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("tagger", sa.String(length=64), nullable=False),
        sa.Column("backend", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("definition_hash", sa.String(length=64), nullable=False),
        sa.Column("template", sa.Text(), nullable=False),
        sa.Column("output_schema", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"),
                  nullable=False),
        sa.PrimaryKeyConstraint("version"),
    )
    op.create_index("ix_tagger_versions_definition", "tagger_versions",
                    ["tagger", "definition_hash"], unique=False)
    op.create_table(
        "rubric_versions",
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("content", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"),
                  nullable=False),
        sa.PrimaryKeyConstraint("version"),
    )
    op.add_column("judgments", sa.Column("attempts", sa.Integer(), server_default="1",
                                         nullable=False))
    op.add_column("judgments", sa.Column("raw_output", sa.Text(), nullable=True))
    op.create_index("ix_tag_failures_tagger_version", "tag_failures", ["tagger", "tagger_version"],
                    unique=False)


def downgrade() -> None:
    op.drop_index("ix_tag_failures_tagger_version", table_name="tag_failures")
    op.drop_column("judgments", "raw_output")
    op.drop_column("judgments", "attempts")
    op.drop_table("rubric_versions")
    op.drop_index("ix_tagger_versions_definition", table_name="tagger_versions")
    op.drop_table("tagger_versions")
