"""Real Python clients against a running Sundial: psycopg 3, asyncpg, SQLAlchemy + pandas.

Usage: python_clients.py PG_HOST PG_PORT DB. The database must hold table cpu with rows
(host=a, usage=1.5, n=3, ok=true, 2023-11-14T22:13:20Z) and (host=b, usage=2.5, n=4, ok=false,
2023-11-14T22:13:30Z). Exits non-zero on the first failed check.
"""
import asyncio
import datetime
import sys

import asyncpg
import pandas as pd
import psycopg
import sqlalchemy as sa

host, port, db = sys.argv[1], int(sys.argv[2]), sys.argv[3]
UTC = datetime.timezone.utc
T0 = datetime.datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)


def check(label, actual, expected):
    if actual != expected:
        sys.exit(f"{label}: expected {expected!r}, got {actual!r}")


# psycopg 3: server-side parameters, a statement prepared after 5 runs, Python types,
# an error and then a good query on the same connection.
with psycopg.connect(f"host={host} port={port} dbname={db} user=sundial") as conn:
    cur = conn.cursor()
    cur.execute("SELECT host, usage, n, ok, time FROM cpu WHERE usage > %s ORDER BY host", (1.0,))
    rows = cur.fetchall()
    check("psycopg rows", rows[0], ("a", 1.5, 3, True, T0))
    check("psycopg tz", rows[0][4].utcoffset(), datetime.timedelta(0))
    for _ in range(10):
        cur.execute("SELECT count(*) FROM cpu WHERE host = %s", ("a",))
        check("psycopg prepared", cur.fetchone()[0], 1)
    try:
        cur.execute("SELECT * FROM no_such_table")
        sys.exit("psycopg: error expected")
    except psycopg.Error as e:
        check("psycopg sqlstate", e.sqlstate, "42P01")
    conn.rollback()
    cur.execute("SELECT count(*) FROM cpu")
    check("psycopg after error", cur.fetchone()[0], 2)
    # DDL, INSERT and a nested transaction (SAVEPOINT) through psycopg's extended protocol.
    cur.execute("CREATE TABLE IF NOT EXISTS py_events (source TEXT, level BIGINT, PRIMARY KEY (source))")
    with conn.transaction():
        cur.execute("INSERT INTO py_events (source, level, time) VALUES (%s, %s, %s)", ("pytest", 3, T0))
    conn.commit()
    cur.execute("SELECT source, level, time FROM py_events")
    check("psycopg insert", cur.fetchall(), [("pytest", 3, T0)])
    # COPY FROM STDIN, rows written one by one as psycopg's copy API does.
    with cur.copy("COPY py_events (source, level, time) FROM STDIN") as copy:
        copy.write_row(("copy-a", 1, T0))
        copy.write_row(("copy-b", 2, T0 + datetime.timedelta(seconds=1)))
    conn.commit()
    cur.execute("SELECT source, level FROM py_events WHERE source LIKE 'copy-%' ORDER BY source")
    check("psycopg copy", cur.fetchall(), [("copy-a", 1), ("copy-b", 2)])


# asyncpg: $1 parameters, binary types throughout.
async def run_asyncpg():
    conn = await asyncpg.connect(host=host, port=port, database=db, user="sundial")
    rows = await conn.fetch("SELECT host, usage, n, ok, time FROM cpu WHERE host = $1", "b")
    check("asyncpg row", tuple(rows[0]), ("b", 2.5, 4, False, datetime.datetime(2023, 11, 14, 22, 13, 30, tzinfo=UTC)))
    value = await conn.fetchval("SELECT max(usage) FROM cpu WHERE time >= $1", T0)
    check("asyncpg timestamptz parameter", value, 2.5)
    await conn.close()


asyncio.run(run_asyncpg())

# SQLAlchemy's inspector and pandas.read_sql.
engine = sa.create_engine(f"postgresql+psycopg://sundial@{host}:{port}/{db}")
check("sqlalchemy tables", sorted(sa.inspect(engine).get_table_names()), ["cpu", "py_events"])
columns = {c["name"]: (type(c["type"]).__name__, c["nullable"]) for c in sa.inspect(engine).get_columns("cpu")}
check("sqlalchemy columns", columns, {
    "host": ("TEXT", True), "region": ("TEXT", True), "usage": ("DOUBLE_PRECISION", True),
    "n": ("BIGINT", True), "ok": ("BOOLEAN", True), "time": ("TIMESTAMP", False),
})
check("sqlalchemy time zone", [c["type"].timezone for c in sa.inspect(engine).get_columns("cpu") if c["name"] == "time"], [True])
df = pd.read_sql("SELECT host, usage, time FROM cpu ORDER BY host", engine)
check("pandas rows", len(df), 2)
check("pandas time dtype", str(df["time"].dtype).startswith("datetime64") and "UTC" in str(df["time"].dtype), True)
check("pandas usage", list(df["usage"]), [1.5, 2.5])
print("python clients ok")
