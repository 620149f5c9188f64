"""security: per-client request ids, served-turn lookup, retention and erasure

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 15:55:00
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('interactions', sa.Column('client_id', sa.String(length=64), nullable=True))
    op.add_column('interactions', sa.Column('request_id', sa.String(length=200), nullable=True))
    op.add_column('interactions', sa.Column(
        'response_md5', sa.String(length=32), sa.Computed('md5(response)', persisted=True),
        nullable=True))
    op.add_column('interactions', sa.Column('text_purged_at', sa.DateTime(timezone=True),
                                            nullable=True))
    op.add_column('interactions', sa.Column('erased_at', sa.DateTime(timezone=True),
                                            nullable=True))
    op.create_index('uq_interactions_client_request', 'interactions',
                    ['client_id', 'request_id'], unique=True,
                    postgresql_where=sa.text('request_id IS NOT NULL'))
    op.create_index('ix_interactions_user_response', 'interactions',
                    ['user_hash', 'response_md5'], unique=False)
    op.add_column('reactions', sa.Column('client_id', sa.String(length=64), nullable=True))
    op.create_table(
        'user_erasures',
        sa.Column('user_hash', sa.String(length=64), nullable=False),
        sa.Column('requested_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                  nullable=False),
        sa.Column('counts', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column('snapshots', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.PrimaryKeyConstraint('user_hash'),
    )


def downgrade() -> None:
    op.drop_table('user_erasures')
    op.drop_column('reactions', 'client_id')
    op.drop_index('ix_interactions_user_response', table_name='interactions')
    op.drop_index('uq_interactions_client_request', table_name='interactions')
    for column in ('erased_at', 'text_purged_at', 'response_md5', 'request_id', 'client_id'):
        op.drop_column('interactions', column)
