"""runs: incremental nights (mode, sweep, covers); run_ranges: swept, mismatches

``mode``: full (every user), due (the users due in the wake-up index, plus a
sweep of the rules whose version changed since the last complete run), verify
(due, then every user: whatever changes then is a mismatch). ``covers``: the
active rule versions the run evaluates, what the next run compares with.

Revision ID: control_0006_incremental
Revises: control_0005_rule_cpu
Create Date: 2026-12-05 08:30:00
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = 'control_0006_incremental'
down_revision = 'control_0005_rule_cpu'
branch_labels = None
depends_on = None

_json = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    op.add_column('runs', sa.Column('mode', sa.Text(), nullable=False, server_default='full'))
    op.add_column('runs', sa.Column('sweep', _json, nullable=True))
    op.add_column('runs', sa.Column('covers', _json, nullable=True))
    op.add_column('run_ranges', sa.Column('swept', sa.Integer(), nullable=False,
                                          server_default='0'))
    op.add_column('run_ranges', sa.Column('mismatches', sa.Integer(), nullable=False,
                                          server_default='0'))


def downgrade() -> None:
    op.drop_column('run_ranges', 'mismatches')
    op.drop_column('run_ranges', 'swept')
    op.drop_column('runs', 'covers')
    op.drop_column('runs', 'sweep')
    op.drop_column('runs', 'mode')
