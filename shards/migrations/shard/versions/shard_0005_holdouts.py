"""episodes.arm: treatment, holdout (a ghost episode) or control (the global group)

Held-out users go through the same episode logic, but nothing is delivered to
them: their episode is recorded with ``arm`` holdout or control (channels/holdouts.py).
Existing rows get NULL, read as treatment.

Revision ID: shard_0005_holdouts
Revises: shard_0004_wake_index
Create Date: 2026-12-05 16:30:00
"""
import sqlalchemy as sa
from alembic import op

revision = 'shard_0005_holdouts'
down_revision = 'shard_0004_wake_index'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('episodes', sa.Column('arm', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('episodes') as batch_op:
        batch_op.drop_column('arm')
