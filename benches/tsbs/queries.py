"""The 15 TSBS cpu-only query types, run against Sundial over the Postgres protocol and against
DuckDB over the same rows exported to Parquet, in the same run, with the same seeded instances.
Every Sundial answer is checked equal to DuckDB's. Prints a markdown table and exits non-zero
on a mismatch. Called by `cargo bench --bench tsbs -- queries` (benches/tsbs/main.rs), which
ingests the data and restarts the server between the two states.

usage: queries.py PG_HOST PG_PORT DB PARQUET STATE START_NS HOSTS HOURS [RUNS]

TSBS_WARMUP=0 in the environment times the first run too (a cold cache's figures).
"""

import os

import datetime
import math
import random
import statistics
import sys
import time

import duckdb
import psycopg

FIELDS = ["usage_user", "usage_system", "usage_idle", "usage_nice", "usage_iowait", "usage_irq",
          "usage_softirq", "usage_steal", "usage_guest", "usage_guest_nice"]
UTC = datetime.timezone.utc


def ts(t):
    return "'" + t.strftime("%Y-%m-%dT%H:%M:%SZ") + "'"


class Instances:
    """Draws query parameters as TSBS does: random hosts without replacement, a random window
    of the given length inside the data set's time range."""

    def __init__(self, start, hosts, hours, seed):
        self.start = start
        self.end = start + datetime.timedelta(hours=hours)
        self.hosts = hosts
        self.rng = random.Random(seed)

    def window(self, hours):
        span = (self.end - self.start - datetime.timedelta(hours=hours)).total_seconds()
        begin = self.start + datetime.timedelta(seconds=self.rng.randrange(0, int(span) + 1))
        return begin, begin + datetime.timedelta(hours=hours)

    def host_list(self, n):
        chosen = self.rng.sample(range(self.hosts), n)
        return "(" + ", ".join(f"'host_{h}'" for h in chosen) + ")"

    def single_groupby(self, metrics, hosts, hours):
        lo, hi = self.window(hours)
        aggs = ", ".join(f"max({f}) AS max_{f}" for f in FIELDS[:metrics])
        return (f"SELECT date_trunc('minute', time) AS minute, {aggs} FROM cpu "
                f"WHERE hostname IN {self.host_list(hosts)} AND time >= {ts(lo)} AND time < {ts(hi)} "
                f"GROUP BY minute ORDER BY minute")

    def cpu_max_all(self, hosts):
        lo, hi = self.window(8)
        aggs = ", ".join(f"max({f}) AS max_{f}" for f in FIELDS)
        return (f"SELECT date_trunc('hour', time) AS hour, {aggs} FROM cpu "
                f"WHERE hostname IN {self.host_list(hosts)} AND time >= {ts(lo)} AND time < {ts(hi)} "
                f"GROUP BY hour ORDER BY hour")

    def double_groupby(self, metrics):
        lo, hi = self.window(12)
        aggs = ", ".join(f"avg({f}) AS mean_{f}" for f in FIELDS[:metrics])
        return (f"SELECT date_trunc('hour', time) AS hour, hostname, {aggs} FROM cpu "
                f"WHERE time >= {ts(lo)} AND time < {ts(hi)} GROUP BY hour, hostname ORDER BY hour, hostname")

    def high_cpu(self, hosts):
        lo, hi = self.window(12)
        where = f" AND hostname IN {self.host_list(hosts)}" if hosts else ""
        return f"SELECT * FROM cpu WHERE usage_user > 90 AND time >= {ts(lo)} AND time < {ts(hi)}{where}"

    def lastpoint(self):
        return "SELECT DISTINCT ON (hostname) * FROM cpu ORDER BY hostname, time DESC"

    def groupby_orderby_limit(self):
        _, hi = self.window(0)
        return (f"SELECT date_trunc('minute', time) AS minute, max(usage_user) FROM cpu "
                f"WHERE time < {ts(hi)} GROUP BY minute ORDER BY minute DESC LIMIT 5")


QUERY_TYPES = [
    ("single-groupby-1-1-1", lambda q: q.single_groupby(1, 1, 1), True),
    ("single-groupby-1-1-12", lambda q: q.single_groupby(1, 1, 12), True),
    ("single-groupby-1-8-1", lambda q: q.single_groupby(1, 8, 1), True),
    ("single-groupby-5-1-1", lambda q: q.single_groupby(5, 1, 1), True),
    ("single-groupby-5-1-12", lambda q: q.single_groupby(5, 1, 12), True),
    ("single-groupby-5-8-1", lambda q: q.single_groupby(5, 8, 1), True),
    ("cpu-max-all-1", lambda q: q.cpu_max_all(1), True),
    ("cpu-max-all-8", lambda q: q.cpu_max_all(8), True),
    ("double-groupby-1", lambda q: q.double_groupby(1), True),
    ("double-groupby-5", lambda q: q.double_groupby(5), True),
    ("double-groupby-all", lambda q: q.double_groupby(10), True),
    ("high-cpu-1", lambda q: q.high_cpu(1), False),
    ("high-cpu-all", lambda q: q.high_cpu(0), False),
    ("lastpoint", lambda q: q.lastpoint(), True),
    ("groupby-orderby-limit", lambda q: q.groupby_orderby_limit(), True),
]


def normal(value):
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return ("t", value.astimezone(UTC).isoformat())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ("n", float(value))
    return ("s", value)


def same(a, b):
    if len(a) != len(b):
        return False
    for ra, rb in zip(a, b):
        if len(ra) != len(rb):
            return False
        for (ka, va), (kb, vb) in zip(ra, rb):
            if ka != kb:
                return False
            if ka == "n":
                if not math.isclose(va, vb, rel_tol=1e-9, abs_tol=1e-9):
                    return False
            elif va != vb:
                return False
    return True


def rows_of(raw, ordered):
    rows = [tuple(normal(v) for v in row) for row in raw]
    return rows if ordered else sorted(rows, key=repr)


def main():
    pg_host, pg_port, db, parquet, state, start_ns, hosts, hours = sys.argv[1:9]
    runs = int(sys.argv[9]) if len(sys.argv) > 9 else 5
    warmup = int(os.environ.get("TSBS_WARMUP", "1"))
    start = datetime.datetime.fromtimestamp(int(start_ns) / 1e9, tz=UTC)
    sundial = psycopg.connect(f"host={pg_host} port={pg_port} dbname={db} user=bench", autocommit=True)
    duck = duckdb.connect()
    duck.execute("SET TimeZone = 'UTC'")
    duck.execute(f"CREATE VIEW cpu AS SELECT * FROM read_parquet('{parquet}')")
    print(f"\n{state}: median of {runs} runs after {warmup} warm-up(s), ms\n")
    print("| query | Sundial | DuckDB | Sundial / DuckDB |")
    print("|---|---|---|---|")
    failures = []
    for seed, (name, make, ordered) in enumerate(QUERY_TYPES):
        q = Instances(start, int(hosts), int(hours), seed)
        instances = [make(q) for _ in range(runs + warmup)]
        timings = {"sundial": [], "duckdb": []}
        for i, sql in enumerate(instances):
            t0 = time.perf_counter()
            # Binary results, as asyncpg and pgjdbc read them.
            with sundial.cursor(binary=True) as cur:
                cur.execute(sql)
                ours = cur.fetchall()
            t1 = time.perf_counter()
            theirs = duck.execute(sql).fetchall()
            t2 = time.perf_counter()
            if i >= warmup:
                timings["sundial"].append(t1 - t0)
                timings["duckdb"].append(t2 - t1)
            if not same(rows_of(ours, ordered), rows_of(theirs, ordered)):
                failures.append(f"{name}: answers differ for {sql}\n  sundial {ours[:3]}… ({len(ours)} rows)\n  duckdb  {theirs[:3]}… ({len(theirs)} rows)")
        s = statistics.median(timings["sundial"]) * 1000
        d = statistics.median(timings["duckdb"]) * 1000
        print(f"| {name} | {s:.1f} | {d:.1f} | {s / d:.2f} |", flush=True)
    if failures:
        print("\n".join(failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
