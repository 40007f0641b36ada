"""rule_versions: holdout, salt; installation_settings (the global control group)

``holdout``: the share of users (0–50 %) a version of a rule holds out: they get a
*ghost* episode and no banner, e-mail or push (channels/holdouts.py). ``salt``: the
string their assignment is hashed with (NULL: the rule's key). Existing versions
hold nobody out.

``installation_settings``: installation-wide values an approver sets at run time
(name -> JSON value); first ``control_group``, ``{"percent": p}``: the global
control group's share (0–15 %), absent: 0.

Revision ID: control_0007_holdouts
Revises: control_0006_incremental
Create Date: 2026-12-05 16:30:00
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = 'control_0007_holdouts'
down_revision = 'control_0006_incremental'
branch_labels = None
depends_on = None

_json = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    op.add_column('rule_versions', sa.Column('holdout', sa.Float(), nullable=False,
                                             server_default='0'))
    op.add_column('rule_versions', sa.Column('salt', sa.Text(), nullable=True))
    op.create_table(
        'installation_settings',
        sa.Column('name', sa.Text(), primary_key=True),
        sa.Column('value', _json, nullable=False),
        sa.Column('updated_by', sa.Text(), nullable=True),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table('installation_settings')
    with op.batch_alter_table('rule_versions') as batch_op:
        batch_op.drop_column('salt')
        batch_op.drop_column('holdout')
