"""Schema changes owned by router, shadow deployments, reactions API.

Adds what the router and the comparison need beyond the initial tables:
- interactions.status / error / stream / ttft_ms: failed or cut-off requests are logged too and
  excluded from comparisons; time to first token for streamed answers.
- reactions.idempotency_key: the client's key, kept so a replay with a different payload is
  detected (the reaction id is derived from it).
- comparison_reports.mlflow_run_id: the MLflow run that holds the rendered report.
- ix_deployments_model_active: the router re-reads the active deployment every few seconds.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("interactions", sa.Column("status", sa.String(length=32), nullable=False,
                                            server_default="ok"))
    op.add_column("interactions", sa.Column("error", sa.Text(), nullable=True))
    op.add_column("interactions", sa.Column("stream", sa.Boolean(), nullable=False,
                                            server_default=sa.false()))
    op.add_column("interactions", sa.Column("ttft_ms", sa.Float(), nullable=True))
    op.add_column("reactions", sa.Column("idempotency_key", sa.String(length=255), nullable=True))
    op.add_column("comparison_reports", sa.Column("mlflow_run_id", sa.String(length=64),
                                                  nullable=True))
    op.create_index("ix_deployments_model_active", "deployments", ["model_name", "active"],
                    unique=False)


def downgrade() -> None:
    op.drop_index("ix_deployments_model_active", table_name="deployments")
    op.drop_column("comparison_reports", "mlflow_run_id")
    op.drop_column("reactions", "idempotency_key")
    op.drop_column("interactions", "ttft_ms")
    op.drop_column("interactions", "stream")
    op.drop_column("interactions", "error")
    op.drop_column("interactions", "status")
