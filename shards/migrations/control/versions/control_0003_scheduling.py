"""scheduling: run kinds and firing keys, range progress, campaigns, APScheduler job store

Revision ID: control_0003_scheduling
Revises: control_0002_admin_ui
Create Date: 2026-11-24 09:00:00
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = 'control_0003_scheduling'
down_revision = 'control_0002_admin_ui'
branch_labels = None
depends_on = None

_json = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.Text(), nullable=False, server_default='manual'))
        batch_op.add_column(sa.Column('rules', _json, nullable=True))
        batch_op.add_column(sa.Column('fire_key', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('published_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column('users_est', sa.BigInteger(), nullable=False, server_default='0')
        )
        batch_op.create_index('runs_fire_key', ['fire_key'], unique=True)
    with op.batch_alter_table('run_ranges', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('est_users', sa.BigInteger(), nullable=False, server_default='0')
        )
        batch_op.add_column(sa.Column('worker', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('started_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('enters', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('exits', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('seconds', sa.Float(), nullable=False, server_default='0'))
    # Runs created before this migration had their jobs published already.
    op.execute("UPDATE runs SET published_at = created_at")
    op.create_table('campaigns',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('rules', _json, nullable=True),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('as_of', sa.Date(), nullable=True),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('campaigns', schema=None) as batch_op:
        batch_op.create_index('campaigns_status_at', ['status', 'at'], unique=False)
    # Exactly APScheduler 3's SQLAlchemyJobStore table (its own create_all then finds it).
    op.create_table('apscheduler_jobs',
    sa.Column('id', sa.Unicode(length=191), nullable=False),
    sa.Column('next_run_time', sa.Float(precision=25), nullable=True),
    sa.Column('job_state', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('apscheduler_jobs', schema=None) as batch_op:
        batch_op.create_index('ix_apscheduler_jobs_next_run_time', ['next_run_time'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('apscheduler_jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_apscheduler_jobs_next_run_time')
    op.drop_table('apscheduler_jobs')
    with op.batch_alter_table('campaigns', schema=None) as batch_op:
        batch_op.drop_index('campaigns_status_at')
    op.drop_table('campaigns')
    with op.batch_alter_table('run_ranges', schema=None) as batch_op:
        for name in ('seconds', 'exits', 'enters', 'started_at', 'worker', 'est_users'):
            batch_op.drop_column(name)
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index('runs_fire_key')
        for name in ('users_est', 'published_at', 'fire_key', 'rules', 'kind'):
            batch_op.drop_column(name)
