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
# One test at a time: the tests mount, capture and make real traffic (ab
# against nginx, hundreds of streams) on a 2-core machine; run side by side
# in one process they starve each other's daemons and their deadlines.
cargo test --locked --workspace -- --test-threads=1
