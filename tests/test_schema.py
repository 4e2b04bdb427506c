"""The migration list and `pending`, as plain data."""

from __future__ import annotations

import hashlib

import pytest

from msbd.db import schema
from msbd.errors import StoreError


def test_versions_count_up_from_one_without_gaps() -> None:
    versions = [m.version for m in schema.MIGRATIONS]
    assert versions == list(range(1, len(versions) + 1))
    assert versions[-1] == schema.LATEST
    assert all(m.statements for m in schema.MIGRATIONS)


# Files in the field were made by these exact statements; migrations after
# them assume so. A change to a released migration is a new migration instead.
RELEASED = {
    1: "73fc5817c8c8657b6bc8b7733a48cbfa87531e26add77a7967759a7808de3dd0",
    2: "80a723337dfc6f07c698c2818eae50e109cc439dcde0d41701a01c3c18cb926b",
    3: "01b26d0bbdd38df9809550cad438636d14ac43277d38833c206de2e5818ec317",
}


@pytest.mark.parametrize(("version", "digest"), sorted(RELEASED.items()))
def test_released_migrations_are_never_edited(version: int, digest: str) -> None:
    migration = schema.MIGRATIONS[version - 1]
    assert migration.version == version
    assert hashlib.sha256("\0".join(migration.statements).encode()).hexdigest() == digest


def test_statements_are_single_statements() -> None:
    # `execute` takes one statement; a stray `;` inside one would fail at open.
    for migration in schema.MIGRATIONS:
        for statement in migration.statements:
            assert ";" not in statement


@pytest.mark.parametrize(("current", "expected"), [
    (0, [1, 2, 3]),
    (schema.LATEST, []),
])
def test_pending(current: int, expected: list[int]) -> None:
    assert [m.version for m in schema.pending(current)] == expected


def test_pending_applies_in_order_from_the_current_version() -> None:
    migrations = (schema.Migration(1, ("a",)), schema.Migration(2, ("b",)),
                  schema.Migration(3, ("c",)))
    assert [m.version for m in schema.pending(1, migrations=migrations)] == [2, 3]
    assert schema.pending(3, migrations=migrations) == []


@pytest.mark.parametrize("current", [schema.LATEST + 1, 1000])
def test_a_newer_database_is_refused(current: int) -> None:
    with pytest.raises(StoreError, match="newer than this msbd") as err:
        schema.pending(current, where="/var/lib/msbd/msbd.db")
    assert "/var/lib/msbd/msbd.db" in str(err.value)
    assert err.value.data == {"user_version": current, "latest": schema.LATEST}


def test_a_negative_version_is_refused() -> None:
    with pytest.raises(StoreError, match="negative"):
        schema.pending(-1)
