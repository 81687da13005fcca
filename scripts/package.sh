#!/usr/bin/env bash
# Builds the Debian package (target/debian/netstatfs_*.deb): the release
# binary, the man page and completions (generated from the command line's
# definition by xtask), the systemd unit and the capability-granting
# postinst. Installs cargo-deb if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo deb --version >/dev/null 2>&1 || cargo install --locked cargo-deb
# The extcap goes to Wireshark's folder for this architecture, which
# Cargo.toml names for amd64 (cargo-deb's asset paths are fixed).
multiarch=$(gcc -print-multiarch 2>/dev/null || echo unknown)
if [ "$multiarch" != x86_64-linux-gnu ]; then
    echo "package: Cargo.toml installs the Wireshark extcap for x86_64-linux-gnu, not $multiarch" >&2
    exit 1
fi
cargo build --release --locked -p netstatfs
cargo run --release --locked -p xtask -- assets target/assets
cargo deb --no-build --locked -p netstatfs
