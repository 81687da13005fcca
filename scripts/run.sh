#!/usr/bin/env bash
# Sets up, builds, and mounts netstatfs at ./m in the foreground.
# Extra arguments go to netstatfs (e.g. --all-processes). Ctrl-C unmounts.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh run
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked
mkdir -p m
exec target/release/netstatfs m "$@"
