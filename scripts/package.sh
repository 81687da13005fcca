#!/usr/bin/env bash
# Builds the Debian package (target/debian/netstatfs_*.deb): the release
# binary, the man page and completions (generated from the command line's
# definition by xtask), the systemd unit and the capability-granting
# postinst. Installs cargo-deb if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo deb --version >/dev/null 2>&1 || cargo install --locked cargo-deb
cargo build --release --locked -p netstatfs
cargo run --release --locked -p xtask -- assets target/assets
cargo deb --no-build --locked -p netstatfs
