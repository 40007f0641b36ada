"""channels: episodes (what was shown and why, banner expiry) and user preferences

Revision ID: shard_0002_channels
Revises: shard_0001
Create Date: 2026-11-24 12:00:00
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = 'shard_0002_channels'
down_revision = 'shard_0001'
branch_labels = None
depends_on = None

_json = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    op.create_table('episodes',
    sa.Column('user_id', sa.BigInteger(), nullable=False),
    sa.Column('rule_key', sa.Text(), nullable=False),
    sa.Column('episode', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('as_of', sa.Date(), nullable=False),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('lang', sa.Text(), nullable=True),
    sa.Column('why', _json, nullable=True),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('user_id', 'rule_key')
    )
    with op.batch_alter_table('episodes', schema=None) as batch_op:
        batch_op.create_index('episodes_expiry', ['status', 'expires_at'], unique=False)
    op.create_table('preferences',
    sa.Column('user_id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('prefs', _json, nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('user_id')
    )


def downgrade() -> None:
    op.drop_table('preferences')
    with op.batch_alter_table('episodes', schema=None) as batch_op:
        batch_op.drop_index('episodes_expiry')
    op.drop_table('episodes')
