#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need, then runs
# the format and lint checks, unit tests, the integration-test binary (real server, real clients) and the SQL logic tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# Real Postgres clients the integration tests drive.
python3 -m pip install --quiet --disable-pip-version-check "psycopg[binary]" asyncpg sqlalchemy pandas duckdb aiosmtpd
# An S3-compatible server with conditional writes, which tests/it/s3.rs starts on loopback.
python3 -m pip install --quiet --disable-pip-version-check "moto[server]==5.2.5"
apt_install() { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; }
command -v psql >/dev/null || apt_install postgresql-client
# HTTPS is checked with curl, against a certificate the tests make with openssl.
command -v curl >/dev/null || apt_install curl
command -v openssl >/dev/null || apt_install openssl
# pgjdbc, driven by tests/clients/JdbcClient.java.
command -v java >/dev/null || apt_install default-jre-headless
[ -f /usr/share/java/postgresql.jar ] || apt_install libpostgresql-jdbc-java
# A real Prometheus Alertmanager that alert rules push to (tests/it/alerts.rs starts it on
# loopback and stops it).
command -v prometheus-alertmanager >/dev/null || apt_install prometheus-alertmanager
# Format and lints first: both are cheap next to the build, and fail fast.
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked --all-targets "$@"
