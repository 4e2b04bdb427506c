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

Version 2: every sandbox gets an immutable `id` (AUTOINCREMENT, never reused),
and everything that acts on a record names it by id: a call that read
sandbox `x` and then waited can never act on a newer sandbox that took the
name meanwhile. `runs` reference the sandbox id; `events` carry it. The
owner's gid and supplementary groups, as the kernel gave them when the
sandbox was created (`SO_PEERCRED`, `SO_PEERGROUPS`), are recorded with it:
path checks and the VM use exactly those (NULL for rows from version 1,
which fall back to the user database). SQLite cannot add a primary key to a
table, so `sandboxes` and `runs` are rebuilt; foreign keys are off while
migrations run (see `store.open_store`), so the old tables can be dropped
in any order. The highest run id ever used is carried over, so run ids are
never reused either.

Version 3: a sandbox's network mode and published ports, copied out of its
(immutable) spec when it is created, as `labels` is: every list entry shows
them, and reading them from the spec would parse every row's JSON. Rows
written before keep NULL and `[]` unless their spec names them.
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
    Migration(2, (
        """
        CREATE TABLE sandboxes_v2 (
            id           INTEGER PRIMARY KEY AUTOINCREMENT,
            name         TEXT NOT NULL UNIQUE,
            owner_uid    INTEGER NOT NULL,
            owner_gid    INTEGER,                  -- NULL: created before version 2
            owner_groups TEXT,                     -- JSON list of gids, or NULL
            state        TEXT NOT NULL,
            spec         BLOB NOT NULL,
            labels       TEXT NOT NULL CHECK (json_type(labels) = 'object'),
            created_at   REAL NOT NULL,
            updated_at   REAL NOT NULL,
            current_run  INTEGER
        )
        """,
        """
        INSERT INTO sandboxes_v2 (name, owner_uid, state, spec, labels, created_at,
                                  updated_at, current_run)
        SELECT name, owner_uid, state, spec, labels, created_at, updated_at, current_run
        FROM sandboxes ORDER BY created_at, name
        """,
        """
        CREATE TABLE runs_v2 (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            sandbox_id  INTEGER NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
            pid         INTEGER,
            proc_start  INTEGER,
            boot_id     TEXT,
            started_at  REAL NOT NULL,
            ended_at    REAL,
            reason      TEXT,
            exit_code   INTEGER,
            signal      INTEGER,
            detail      TEXT
        )
        """,
        # Never reuse a run id, even one whose rows were removed.
        """
        INSERT INTO sqlite_sequence (name, seq)
        SELECT 'runs_v2', seq FROM sqlite_sequence WHERE name = 'runs'
        """,
        """
        INSERT INTO runs_v2 (id, sandbox_id, pid, proc_start, boot_id, started_at, ended_at,
                             reason, exit_code, signal, detail)
        SELECT r.id, s.id, r.pid, r.proc_start, r.boot_id, r.started_at, r.ended_at,
               r.reason, r.exit_code, r.signal, r.detail
        FROM runs AS r JOIN sandboxes_v2 AS s ON s.name = r.sandbox
        """,
        "DROP TABLE runs",
        "DROP TABLE sandboxes",
        "ALTER TABLE sandboxes_v2 RENAME TO sandboxes",
        "ALTER TABLE runs_v2 RENAME TO runs",
        "CREATE INDEX sandboxes_by_state ON sandboxes (state)",
        "CREATE INDEX sandboxes_by_owner ON sandboxes (owner_uid, id)",
        "CREATE INDEX runs_by_sandbox ON runs (sandbox_id)",
        "ALTER TABLE events ADD COLUMN sandbox_id INTEGER",
        "CREATE INDEX events_by_owner ON events (owner_uid, seq)",
    )),
    Migration(3, (
        "ALTER TABLE sandboxes ADD COLUMN network TEXT",
        "ALTER TABLE sandboxes ADD COLUMN ports TEXT NOT NULL DEFAULT '[]'",
        """
        UPDATE sandboxes
        SET network = json_extract(spec, '$.network'),
            ports = coalesce(json_extract(spec, '$.ports'), '[]')
        WHERE json_valid(spec)
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
