"""rule_versions.variants; banner_variant_stats

``variants``: a version's content variants, ``[{key, weight, banner?, email?}, ...]``
(NULL: none); each user's variant is fixed by the hash (channels/variants.py).
``banner_variant_stats``: banner impressions and clicks per rule, variant and day.

Revision ID: control_0008_variants
Revises: control_0007_holdouts
Create Date: 2026-12-05 20:20:00
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = 'control_0008_variants'
down_revision = 'control_0007_holdouts'
branch_labels = None
depends_on = None

_json = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    op.add_column('rule_versions', sa.Column('variants', _json, nullable=True))
    op.create_table(
        'banner_variant_stats',
        sa.Column('rule_key', sa.Text(), nullable=False),
        sa.Column('variant', sa.Text(), nullable=False),
        sa.Column('day', sa.Date(), nullable=False),
        sa.Column('impressions', sa.BigInteger(), nullable=False, server_default='0'),
        sa.Column('clicks', sa.BigInteger(), nullable=False, server_default='0'),
        sa.PrimaryKeyConstraint('rule_key', 'variant', 'day'),
    )


def downgrade() -> None:
    op.drop_table('banner_variant_stats')
    with op.batch_alter_table('rule_versions') as batch_op:
        batch_op.drop_column('variants')
