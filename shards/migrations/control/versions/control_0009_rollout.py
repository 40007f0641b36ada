"""rules: rollout, rollout_from (canary rollout of a new version)

While ``rollout`` is set (1–99 %), the rule's current ``version`` applies to the users
whose ``bucket(salt + "/rollout", user)`` falls in the first ``rollout`` % of the
buckets, and ``rollout_from`` (the version live before) to everyone else
(catalogue/rollout.py). NULL: no canary, the current version for everyone.

Revision ID: control_0009_rollout
Revises: control_0008_variants
Create Date: 2026-12-05 20:10:00
"""
import sqlalchemy as sa
from alembic import op

revision = 'control_0009_rollout'
down_revision = 'control_0008_variants'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('rules', sa.Column('rollout', sa.Integer(), nullable=True))
    op.add_column('rules', sa.Column('rollout_from', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('rules') as batch_op:
        batch_op.drop_column('rollout_from')
        batch_op.drop_column('rollout')
