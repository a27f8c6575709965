#!/usr/bin/env bash
# The test command: installs what the tests need (idempotently), then runs
# every test of the workspace. Tests that need a foreign tool skip with a
# message when it is missing, except under CI (CI=true), where a missing
# tool fails them: this script installs them first.
set -euo pipefail
cd "$(dirname "$0")/.."

# tool (or file) : Debian package. The tracker's tests drive it with real,
# foreign NBD clients and a real ext4 through nbdfuse + loop.
need_apt=()
for pair in "e2fsck:e2fsprogs" "openssl:openssl" "qemu-io:qemu-utils" "nbdinfo:libnbd-bin" \
            "nbdcopy:libnbd-bin" "nbdfuse:libnbd-bin" "nbdkit:nbdkit" "promtool:prometheus" \
            "fusermount3:fuse3" "losetup:mount" "/usr/lib/python3/dist-packages/nbd.py:python3-libnbd" \
            "groff:groff-base" "systemd-analyze:systemd" "debootstrap:debootstrap" "rpm:rpm" \
            "virt-xml-validate:libvirt-clients" "xmllint:libxml2-utils"; do
    tool=${pair%%:*}; pkg=${pair#*:}
    if [[ $tool == /* ]]; then [ -e "$tool" ] && continue; else command -v "$tool" >/dev/null 2>&1 && continue; fi
    need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "==> installing ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${need_apt[@]}" >/dev/null 2>&1 || {
        apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
    }
fi

# The Ceph store's tests start a throwaway cluster (scripts/ceph-testbed.sh:
# mon + OSD, no systemd); the bindings link librados2/librbd1 (pulled in by
# ceph-common), no -dev packages.
need_ceph=()
for pair in "ceph-mon:ceph-mon" "ceph-osd:ceph-osd" "ceph:ceph-common"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need_ceph+=("${pair#*:}")
done
if [ ${#need_ceph[@]} -gt 0 ]; then
    echo "==> installing ${need_ceph[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${need_ceph[@]}" >/dev/null 2>&1 || {
        apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_ceph[@]}" >/dev/null
    }
fi

# The web console's browser test (tests/console_browser.rs) drives Debian's
# chromium through chromedriver; NSS's certutil/pk12util make each browser
# identity's certificate database. Without the recommends (they pull in
# systemd, udev, avahi and more). Headless Chromium cannot show its
# client-certificate picker: a managed policy picks the certificate for
# https://127.0.0.1 (loopback only, where the test's console listens).
need_browser=()
for pair in "chromium:chromium" "chromedriver:chromium-driver" "certutil:libnss3-tools"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need_browser+=("${pair#*:}")
done
if [ ${#need_browser[@]} -gt 0 ]; then
    echo "==> installing ${need_browser[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${need_browser[@]}" >/dev/null 2>&1 || {
        apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_browser[@]}" >/dev/null
    }
fi
policy=/etc/chromium/policies/managed/tidemark-tests.json
if [ ! -e "$policy" ]; then
    mkdir -p "$(dirname "$policy")"
    printf '%s\n' '{ "AutoSelectCertificateForUrls": [ "{\"pattern\":\"https://127.0.0.1:*\",\"filter\":{}}" ] }' > "$policy"
fi

# The VM boot test also boots through libvirt: a libvirtd of its own
# (Debian's daemon and qemu driver, no systemd; without the recommends,
# which pull in other hypervisors' drivers).
if ! command -v libvirtd >/dev/null 2>&1 ||
   [ ! -e /usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so ]; then
    echo "==> installing libvirt-daemon libvirt-daemon-driver-qemu"
    export DEBIAN_FRONTEND=noninteractive
    libvirt=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)
    apt-get install -y -qq --no-install-recommends "${libvirt[@]}" >/dev/null 2>&1 || {
        apt-get update -qq && apt-get install -y -qq --no-install-recommends "${libvirt[@]}" >/dev/null
    }
fi

# The kernel tests boot a Debian kernel under qemu (bookworm-backports'
# qemu-system-x86, busybox-static, kmod, nbd-client); the kernel itself is
# fetched (and cached under target/) on first use.
scripts/kernel-vm.sh install

# The packaging test builds .deb and .rpm packages (scripts/package.sh).
for tool in cargo-deb:3.8.0 cargo-generate-rpm:0.21.1; do
    command -v "${tool%%:*}" >/dev/null 2>&1 && continue
    echo "==> installing ${tool%%:*} (once)"
    cargo install --locked --quiet "${tool%%:*}" --version "${tool#*:}"
done

echo "==> cargo test --workspace"
cargo test --workspace --all-targets --no-fail-fast

# The Ceph bindings are behind a feature (a default build links no Ceph):
# their tests against the real cluster run here.
echo "==> cargo test -p tidemark-ceph --features librados"
cargo test -p tidemark-ceph --features librados --all-targets --no-fail-fast
# The replica store engine on Ceph and the group leases between two
# receivers, against the real cluster (their crash and takeover tests on
# the simulated cluster ran with the workspace above).
echo "==> cargo test -p tidemark-receiver --features ceph --test ceph_store_live --test ceph_lease_live"
cargo test -p tidemark-receiver --features ceph --test ceph_store_live --test ceph_lease_live --no-fail-fast
# End to end on the Ceph store (`[receiver.store] kind = "ceph"`): one
# receiver replicating into the cluster, and two receivers where the owner
# of a group is SIGKILLed or frozen and the other takes over, or the holder
# of a span's lease is SIGKILLed and the other takes the span and its
# members over; and one receiver through a 30 s freeze of the cluster's
# OSD. The tidemark binary is rebuilt with its feature `ceph` for them
# (tests/lib.rs).
echo "==> cargo test -p tidemark-e2e --features ceph --test ceph_store --test ceph_takeover --test ceph_span --test ceph_outage"
cargo test -p tidemark-e2e --features ceph --test ceph_store --test ceph_takeover --test ceph_span --test ceph_outage --no-fail-fast

# Every decoder, fuzzed for a bounded time (installs cargo-fuzz once).
echo "==> scripts/fuzz.sh"
scripts/fuzz.sh "${FUZZ_SECONDS:-15}"
