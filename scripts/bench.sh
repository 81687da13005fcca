#!/usr/bin/env bash
# Runs the benchmark harness: netstatfs against ss, netstat, lsof and
# tcpdump on the same workload, in one run. Prints Markdown tables (the
# contents of BENCHMARKS.md). Extra arguments go to the harness (--quick,
# --only listing,capture,latency,memory). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh bench
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked --bin netstatfs --example bench
exec target/release/examples/bench --netstatfs target/release/netstatfs "$@"
