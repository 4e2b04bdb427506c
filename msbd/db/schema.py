"""The database schema as numbered migrations, oldest first; pure data, no I/O.

How it works: SQLite's `PRAGMA user_version` holds the number of the last
migration applied (0 for a new file). `store.open_store` asks `pending` which
migrations are missing and applies each in its own `BEGIN IMMEDIATE`
transaction, re-reading `user_version` inside it (so two processes opening the
same file cannot both apply one) and setting it in the same transaction. A
released migration is never edited: a change is a new, higher version.

A migration is a tuple of single statements rather than one script because
Python's `executescript` commits any open transaction before it runs, which
would break "one migration, one transaction".

Schema decisions (version 1):
- `runs.sandbox` references `sandboxes(name) ON DELETE CASCADE`: removing a
  sandbox removes its runs in the same statement.
- `sandboxes.current_run` is a plain integer, not a foreign key: a reference
  back to `runs` would make a cycle, and every insert and delete would then
  depend on statement order (or need deferred constraints). The store is the
  only writer and points `current_run` only at a run of the same sandbox that
  it inserted in the same transaction.
- `events` has no foreign key: events are history and outlive the sandbox.
  `runs.id` and `events.seq` are AUTOINCREMENT, so neither is ever reused
  after a removal or a prune (subscribers resume from a `seq`).
- Times are REAL unix seconds; states and reasons are their enum values.
- No `STRICT` tables and no CHECK on state values: both would tie the file to
  newer SQLite or force a table rebuild to add a state. Values are checked
  when the store decodes them.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from msbd.errors import StoreError


class Migration(NamedTuple):
    version: int
    statements: tuple[str, ...]


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(1, (
        """
        CREATE TABLE sandboxes (
            name        TEXT NOT NULL PRIMARY KEY,
            owner_uid   INTEGER NOT NULL,
            state       TEXT NOT NULL,
            spec        BLOB NOT NULL,             -- msgspec JSON of LaunchSpec
            labels      TEXT NOT NULL              -- JSON object, == spec.labels
                        CHECK (json_type(labels) = 'object'),
            created_at  REAL NOT NULL,
            updated_at  REAL NOT NULL,
            current_run INTEGER                    -- runs.id, NULL before the first start
        )
        """,
        "CREATE INDEX sandboxes_by_state ON sandboxes (state)",
        "CREATE INDEX sandboxes_by_created ON sandboxes (created_at, name)",
        """
        CREATE TABLE runs (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            sandbox     TEXT NOT NULL REFERENCES sandboxes (name) ON DELETE CASCADE,
            pid         INTEGER,
            proc_start  INTEGER,                   -- /proc/PID/stat field 22, clock ticks
            boot_id     TEXT,                      -- /proc/sys/kernel/random/boot_id
            started_at  REAL NOT NULL,
            ended_at    REAL,
            reason      TEXT,
            exit_code   INTEGER,
            signal      INTEGER,
            detail      TEXT
        )
        """,
        "CREATE INDEX runs_by_sandbox ON runs (sandbox)",
        "CREATE INDEX runs_live ON runs (sandbox) WHERE ended_at IS NULL",
        """
        CREATE TABLE events (
            seq         INTEGER PRIMARY KEY AUTOINCREMENT,
            time        REAL NOT NULL,
            sandbox     TEXT NOT NULL,
            owner_uid   INTEGER NOT NULL,
            state       TEXT NOT NULL,
            run_id      INTEGER,
            reason      TEXT,
            exit_code   INTEGER,
            signal      INTEGER,
            detail      TEXT
        )
        """,
    )),
)

LATEST: Final = MIGRATIONS[-1].version


def pending(current: int, *, where: str = "the database",
            migrations: tuple[Migration, ...] = MIGRATIONS) -> list[Migration]:
    """The migrations a database at `current` still needs, in order.

    Raises `StoreError` when the database is newer than this code knows: an
    older msbd must not write to a file whose meaning it does not know.
    """
    latest = migrations[-1].version if migrations else 0
    if current > latest:
        raise StoreError(
            f"{where} is at schema version {current}, newer than this msbd knows "
            f"({latest}): run a newer msbd or use another state directory",
            data={"user_version": current, "latest": latest})
    if current < 0:
        raise StoreError(f"{where} has a negative schema version {current}",
                         data={"user_version": current})
    return [m for m in migrations if m.version > current]
