#!/usr/bin/env python3
"""The cost of updating a history order row (api/src/store.rs, `Store::write_history`) with the
indexed columns named in the upsert's SET and without them.

The orders table and its two indexes as api/src/store.rs created them before the history
moved into chunks (952f09c; the figures the README quotes are of that layout), 200,000 rows, then 50,000
of them upserted again (a later fill or cancel of an order that rested) in one transaction, WAL
and synchronous=NORMAL as the history's connection. Prints the best of three runs per variant, in
µs per update (Python's sqlite3 module: its own overhead is in both figures).

    python3 scripts/bench-history-upsert.py
"""
import os
import random
import sqlite3
import tempfile
import time

SCHEMA = """
CREATE TABLE orders(order_id INTEGER PRIMARY KEY, account INTEGER NOT NULL, market INTEGER NOT NULL,
  client_id TEXT NOT NULL, time_ms INTEGER NOT NULL, data BLOB NOT NULL);
CREATE INDEX orders_by_account ON orders(account, market, order_id);
CREATE INDEX orders_by_client ON orders(account, client_id);
"""
INSERT = "INSERT INTO orders(order_id, account, market, client_id, time_ms, data) VALUES (?,?,?,?,?,?) "
VARIANTS = {
    "account and market in the SET (before)": INSERT
    + "ON CONFLICT(order_id) DO UPDATE SET account = excluded.account, market = excluded.market, "
    "client_id = excluded.client_id, time_ms = excluded.time_ms, data = excluded.data",
    "without them (now)": INSERT
    + "ON CONFLICT(order_id) DO UPDATE SET "
    "client_id = excluded.client_id, time_ms = excluded.time_ms, data = excluded.data",
}
ROWS, UPDATES = 200_000, 50_000

random.seed(7)
for name, sql in VARIANTS.items():
    with tempfile.TemporaryDirectory() as d:
        c = sqlite3.connect(os.path.join(d, "h.sqlite"), isolation_level=None)
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=NORMAL")
        c.executescript(SCHEMA)
        c.execute("BEGIN")
        c.executemany(INSERT, ((i, i % 64, 0, f"{i:022d}", i, b"x" * 66) for i in range(ROWS)))
        c.execute("COMMIT")
        rows = sorted((i, i % 64, 0, f"{i:022d}", i + 1, b"y" * 66) for i in random.sample(range(ROWS), UPDATES))
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            c.execute("BEGIN")
            c.executemany(sql, rows)
            c.execute("COMMIT")
            best = min(best, time.perf_counter() - t)
        c.close()
    print(f"{name}: {best / UPDATES * 1e6:.2f} µs per update")
