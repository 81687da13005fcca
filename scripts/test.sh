#!/usr/bin/env bash
# Sets up everything the tests need, then checks formatting and lints and
# runs the whole test suite (unit tests and tests through a real mount;
# needs root and /dev/fuse).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
# The Debian package the package test installs.
scripts/package.sh
cargo test --locked --workspace
