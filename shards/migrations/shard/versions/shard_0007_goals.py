"""goal_exposures: every episode started (real or ghost) with its arm, and its conversion

A rule's goal (rules/goals.py) counts at most one conversion per episode within the
rule's attribution window; ``episodes`` keeps only a user's latest episode of a
rule, so the experiment's history has its own table (channels/goals.py).

Revision ID: shard_0007_goals
Revises: shard_0006_variants
Create Date: 2026-12-05 20:10:00
"""
import sqlalchemy as sa
from alembic import op

revision = 'shard_0007_goals'
down_revision = 'shard_0006_variants'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'goal_exposures',
        sa.Column('rule_key', sa.Text(), nullable=False),
        sa.Column('user_id', sa.BigInteger(), nullable=False),
        sa.Column('episode', sa.Integer(), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('arm', sa.Text(), nullable=False),
        sa.Column('variant', sa.Text(), nullable=True),
        sa.Column('started_on', sa.Date(), nullable=False),
        sa.Column('converted_on', sa.Date(), nullable=True),
        sa.PrimaryKeyConstraint('rule_key', 'user_id', 'episode'),
    )


def downgrade() -> None:
    op.drop_table('goal_exposures')
