"""banners.variant, episodes.variant: the content variant shown (channels/variants.py)

The variant a user's banner shows, and the one their episode got — or, a ghost
episode, would have got. NULL: the rule has no variants (existing rows too).

Revision ID: shard_0006_variants
Revises: shard_0005_holdouts
Create Date: 2026-12-05 20:20:00
"""
import sqlalchemy as sa
from alembic import op

revision = 'shard_0006_variants'
down_revision = 'shard_0005_holdouts'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('banners', sa.Column('variant', sa.Text(), nullable=True))
    op.add_column('episodes', sa.Column('variant', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('episodes') as batch_op:
        batch_op.drop_column('variant')
    with op.batch_alter_table('banners') as batch_op:
        batch_op.drop_column('variant')
