"""user_state: the wake-up index (as_of, wake_on)

``as_of``: the date the stored state was computed for. ``wake_on``: the earliest
date on which any active rule's answer for the user could change with no change
to the profile (its time horizon; NULL: never by time alone). A nightly run for
date D reads only the users due (no state, no ``as_of``, ``as_of`` after D, or
``wake_on`` on or before D). Existing rows get NULLs: due at the next run.

Revision ID: shard_0004_wake_index
Revises: shard_0003_profiles_json
Create Date: 2026-12-05 08:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = 'shard_0004_wake_index'
down_revision = 'shard_0003_profiles_json'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('user_state', sa.Column('as_of', sa.Date(), nullable=True))
    op.add_column('user_state', sa.Column('wake_on', sa.Date(), nullable=True))
    op.create_index('ix_user_state_wake_on', 'user_state', ['wake_on'])


def downgrade() -> None:
    op.drop_index('ix_user_state_wake_on', table_name='user_state')
    op.drop_column('user_state', 'wake_on')
    op.drop_column('user_state', 'as_of')
