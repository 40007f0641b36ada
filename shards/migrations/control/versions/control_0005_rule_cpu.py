"""run_ranges.rule_cpu: CPU seconds each rule used on a range (sampled by the budget watchdog)

Revision ID: control_0005_rule_cpu
Revises: control_0004_channels
Create Date: 2026-11-24 10:30:00
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = 'control_0005_rule_cpu'
down_revision = 'control_0004_channels'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('run_ranges', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                'rule_cpu',
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'),
                nullable=True,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table('run_ranges', schema=None) as batch_op:
        batch_op.drop_column('rule_cpu')
