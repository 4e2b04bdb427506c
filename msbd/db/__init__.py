"""Persistence: sandboxes, runs and the events log in one SQLite file.

`store.open_store(path)` is the way in; `schema` holds the numbered
migrations. This package is the only place msbd talks to SQLite.
"""
