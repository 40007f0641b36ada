"""channels: ledger category/critical/reason/finished_at, per-rule and per-run indexes, banner_stats

Revision ID: control_0004_channels
Revises: control_0003_scheduling
Create Date: 2026-11-24 12:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = 'control_0004_channels'
down_revision = 'control_0003_scheduling'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('ledger', schema=None) as batch_op:
        batch_op.add_column(sa.Column('category', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('critical', sa.Boolean(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('reason', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index('ledger_rule', ['rule_key', 'status'], unique=False)
        batch_op.create_index('ledger_run', ['run_id'], unique=False)
    op.create_table('banner_stats',
    sa.Column('rule_key', sa.Text(), nullable=False),
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('impressions', sa.BigInteger(), nullable=False, server_default='0'),
    sa.Column('clicks', sa.BigInteger(), nullable=False, server_default='0'),
    sa.PrimaryKeyConstraint('rule_key', 'day')
    )


def downgrade() -> None:
    op.drop_table('banner_stats')
    with op.batch_alter_table('ledger', schema=None) as batch_op:
        batch_op.drop_index('ledger_run')
        batch_op.drop_index('ledger_rule')
        for name in ('finished_at', 'reason', 'critical', 'category'):
            batch_op.drop_column(name)
