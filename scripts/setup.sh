#!/usr/bin/env bash
# Installs what netstatfs needs on a Debian/Ubuntu machine, skipping what is
# already there, without a terminal.
#   scripts/setup.sh run     build and mount (libpcap, fuse3, a C toolchain, Rust)
#   scripts/setup.sh test    run + the tools the tests look through
#   scripts/setup.sh bench   run + the tools the benchmarks compare with
set -euo pipefail

profile=${1:-run}
packages=(build-essential pkg-config libpcap-dev fuse3 curl ca-certificates)
if [ "$profile" = test ]; then
    # tcpdump and tshark read the streams; attr gives getfattr/setfattr;
    # iproute2 makes network namespaces; util-linux gives unshare, setpriv
    # and mount; libcap2-bin gives setcap/capsh; coreutils gives timeout.
    # man-db and systemd (systemd-analyze) check the Debian package.
    packages+=(tcpdump tshark attr iproute2 util-linux mount libcap2-bin coreutils procps passwd
               man-db systemd init-system-helpers)
    # Real programs the attribution tests watch: a prefork nginx under ab,
    # a shell's curls, dig against dnsmasq, a shell that execs redis-cli.
    packages+=(nginx-light apache2-utils curl dnsmasq-base bind9-dnsutils redis-server redis-tools)
    # A local user's reader of many streams at once (Debian's, which any
    # user may run, not a toolchain's under /root).
    packages+=(python3)
    # Real containers: a test starts its own dockerd (its own data root,
    # bridge and socket; no service is started here) and imports a busybox
    # image made from busybox-static (no registry is reachable).
    packages+=(docker.io busybox-static tar)
    # And a podman container (names from its conmon), with storage of the
    # test's own.
    packages+=(podman)
    # The Kubernetes manifest is checked as YAML (kubectl cannot without a
    # cluster).
    packages+=(python3-yaml)
fi

if [ "$profile" = bench ]; then
    packages+=(tcpdump iproute2 net-tools lsof procps redis-server redis-tools)
fi

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # tshark's package asks whether non-root users may capture: answer no.
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections 2>/dev/null || true
    apt-get update -qq
    # No service may start from a package (nginx would take port 80): the
    # tests start what they need themselves.
    policy=/usr/sbin/policy-rc.d
    made_policy=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [ -n "$made_policy" ]; then rm -f "$policy"; fi
fi

# Rust, from rustup, if the machine has none.
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: installing Rust with rustup" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component rustfmt,clippy
fi
if [ "$profile" = test ] && command -v rustup >/dev/null 2>&1; then
    for component in rustfmt clippy; do
        rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
    done
fi

# The kernel side of FUSE. Users mount through fusermount3, which opens
# /dev/fuse as the user: the fuse3 package's udev rule makes it 0666, which
# machines without udev (containers, some VMs) never apply.
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
if [ -c /dev/fuse ] && [ "$(stat -c %a /dev/fuse)" != 666 ]; then
    chmod 0666 /dev/fuse || true
fi
