#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need, then runs
# unit tests, the integration-test binary (real server, real clients) and the SQL logic tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# Real Postgres clients the integration tests drive (psql comes with the machine image).
python3 -m pip install --quiet --disable-pip-version-check "psycopg[binary]" asyncpg sqlalchemy pandas
command -v psql >/dev/null || { apt-get update -qq && apt-get install -y -qq postgresql-client; }
cargo test --locked --all-targets "$@"
