#!/usr/bin/env bash
# Supply chain: fails when Cargo.lock holds a crate version with a RustSec advisory
# (a vulnerable hyper, h2, rustls, tokio, ...). Needs the advisory database, a git repository
# on github.com. Where the machine cannot reach it (this project's CI machines reach only the
# package registries), the check cannot run: it says so loudly and exits 0, so the rest of CI
# still gates the change. Set AUDIT_REQUIRED=1 to make an unreachable database a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

db_url=https://github.com/rustsec/advisory-db
if ! timeout 20 git ls-remote --heads "$db_url" >/dev/null 2>&1; then
  echo "!! supply-chain check NOT RUN: the RustSec advisory database ($db_url) is unreachable from this machine"
  [ "${AUDIT_REQUIRED:-0}" = 1 ] && exit 1
  exit 0
fi
if ! command -v cargo-audit >/dev/null 2>&1; then
  cargo install cargo-audit --locked --quiet
fi
# Vulnerabilities fail; warnings (unmaintained, yanked) are reported.
cargo audit
