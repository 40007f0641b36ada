"""profiles: doc and seen as json text instead of jsonb; fillfactor 70

Nothing queries inside a profile in SQL: ingest reads and writes whole
documents, the evaluation streams them out. With ``jsonb`` PostgreSQL converted
every document to its binary form on each write and back to text on each read
(bench/bench_ingest.py, docs/ingest.md: ~3 µs of server CPU per row written and
~2 µs per row read). ``json`` only checks the syntax and stores the text as
given. Free space left on each page (fillfactor 70) lets an update put the new
row version on the same page: a HOT update, with no new index entry.

On PostgreSQL this rewrites the table under an exclusive lock (about as long as
COPYing it); SQLite keeps its JSON columns (no-op there).

Revision ID: shard_0003_profiles_json
Revises: shard_0002_channels
Create Date: 2026-11-24 10:30:00
"""
from alembic import op

revision = 'shard_0003_profiles_json'
down_revision = 'shard_0002_channels'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute(
        "ALTER TABLE profiles ALTER COLUMN doc TYPE json USING doc::json, "
        "ALTER COLUMN seen TYPE json USING seen::json, SET (fillfactor = 70)"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute(
        "ALTER TABLE profiles ALTER COLUMN doc TYPE jsonb USING doc::jsonb, "
        "ALTER COLUMN seen TYPE jsonb USING seen::jsonb, RESET (fillfactor)"
    )
