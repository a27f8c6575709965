#!/bin/bash
# Guest side of tests/tests/operator_guide_vm.rs: the README's operator
# guide, run line by line as an operator types it, on a Debian bookworm
# whose PID 1 is systemd (scripts/system-vm.sh). Run at boot by
# tidemark-guide-test.service, as root.
#
# One machine plays both sites: the protected host (`host$`) and the
# replica site (`dr$`), with the receiver on loopback. They share
# /etc/tidemark/pki, so step 3's "copy host.crt and ca.crt" has nothing to
# copy. Step 9 (failback, a third role) and the recovery plans of step 8
# are not run here; tests/tests/replication.rs and tests/tests/plans.rs run
# those commands.
#
# What the test provides:
#   /root/debs/*.deb                       the packages of scripts/package.sh
#   /dev/disk/by-id/virtio-tidemark-data   the disk to protect
#
# Console lines for the test:
#   TIDEMARK-VM-RUN: LINE    a line of the guide, about to run (bash -c LINE)
#   TIDEMARK-VM-OK: LINE     it succeeded, and what it should do was checked
#   TIDEMARK-VM-STEP: N ...  progress
#   TIDEMARK-VM-PASS | TIDEMARK-VM-FAIL: reason
set -uo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

data=/dev/disk/by-id/virtio-tidemark-data
host=db1.example.com
replicas=/var/lib/tidemark/replicas

finish() {
    sync
    systemctl poweroff --force
    sleep 600
}

fail() {
    echo "TIDEMARK-VM-FAIL: $*"
    echo "----- systemctl status tidemark-* -----"
    systemctl --no-pager --full status 'tidemark-*' 2>&1 | tail -n 60
    echo "----- journal of the tidemark units -----"
    journalctl --no-pager -b -u 'tidemark-*' 2>&1 | tail -n 80
    finish
    exit 1
}

step() { echo "TIDEMARK-VM-STEP: $*"; }

# Runs one line of the guide exactly as written (globs and all) in the
# current directory; its output goes to the console.
guide() {
    echo "TIDEMARK-VM-RUN: $1"
    bash -c "$1"
    local rc=$?
    [ $rc -eq 0 ] || fail "the guide's \`$1\` exited with status $rc"
}

# Like guide, and keeps the output in $out for checks instead of printing
# it.
guide_quiet() {
    echo "TIDEMARK-VM-RUN: $1"
    out=$(bash -c "$1")
    local rc=$?
    [ $rc -eq 0 ] || { printf '%s\n' "$out"; fail "the guide's \`$1\` exited with status $rc"; }
}

# Like guide_quiet, and prints the output too.
guide_out() {
    guide_quiet "$1"
    printf '%s\n' "$out"
}

ok() { echo "TIDEMARK-VM-OK: $1"; }

expect_active() {
    local unit
    for unit in "$@"; do
        [ "$(systemctl is-active "$unit")" = active ] || fail "$unit is not active"
    done
}

expect_inactive() {
    local unit
    for unit in "$@"; do
        [ "$(systemctl is-active "$unit")" = inactive ] || fail "$unit is $(systemctl is-active "$unit"), not inactive"
    done
}

# Waits until the receiver has made the whole change log durable.
wait_caught_up() {
    local last durable state status i
    for i in $(seq 600); do
        last=$(tidemark log check --json /var/lib/tidemark/log | jq -r '.last_seq // empty')
        status=$(tidemark shipper status --json --log-dir /var/lib/tidemark/log 2>/dev/null)
        durable=$(printf '%s\n' "$status" | jq -r '.durable_seq // empty' 2>/dev/null)
        state=$(printf '%s\n' "$status" | jq -r '.state // empty' 2>/dev/null)
        if [ -n "$last" ] && [ "$durable" = "$last" ] && [ "$state" = protected ]; then
            return 0
        fi
        sleep 0.5
    done
    tidemark shipper status --log-dir /var/lib/tidemark/log
    fail "replication did not catch up with the log (last record $last, durable $durable)"
}

echo "TIDEMARK-VM-BOOTED: systemd $(systemctl --version | head -n 1 | cut -d' ' -f2), kernel $(uname -r), up $(cut -d' ' -f1 /proc/uptime) s"
[ "$(ps -o comm= -p 1)" = systemd ] || fail "PID 1 is $(ps -o comm= -p 1), not systemd"
# Booted does not mean udev has named every disk yet.
udevadm settle --timeout=60
for _ in $(seq 60); do [ -b "$data" ] && break; sleep 0.5; done
[ -b "$data" ] || fail "no $data (udev did not name the test's disk)"

step "1. Install"
cd /root/debs || fail "no /root/debs"
line='dpkg -i tidemark-common_*.deb tidemark-receiver_*.deb'
guide "$line"; ok "$line"
line='dpkg -i tidemark-common_*.deb tidemark-agent_*.deb'
guide "$line"
# Enabled, not started: the shipped configs must be edited first.
for unit in tidemark-tracker tidemark-shipper tidemark-receiver; do
    [ "$(systemctl is-enabled $unit)" = enabled ] || fail "$unit is not enabled"
done
expect_inactive tidemark-tracker tidemark-shipper tidemark-receiver
ok "$line"

step "2. Initialise the receiver"
line='tidemark receiver init --pki-dir /etc/tidemark/pki'
guide "$line"; ok "$line"
line='chown -R root:tidemark /etc/tidemark/pki && chmod 0750 /etc/tidemark/pki && chmod 0640 /etc/tidemark/pki/*.key'
guide "$line"; ok "$line"
line='tidemark config check /etc/tidemark/receiver.toml'
guide "$line"; ok "$line"
line='systemctl start tidemark-receiver'
guide "$line"
expect_active tidemark-receiver
[ "$(ps -o user= -p "$(systemctl show -P MainPID tidemark-receiver)")" = tidemark ] ||
    fail "the receiver does not run as the tidemark user"
ok "$line"

step "3. Enrol the host"
line="tidemark host request --host $host --pki-dir /etc/tidemark/pki"
guide "$line"; ok "$line"
# The request is in the shared pki directory: sign it there.
cd /etc/tidemark/pki || fail "no /etc/tidemark/pki"
line="tidemark receiver sign --pki-dir /etc/tidemark/pki --host $host --csr host.csr --out host.crt"
guide "$line"
[ -s host.crt ] && [ -s ca.crt ] || fail "no host.crt or ca.crt in /etc/tidemark/pki"
ok "$line"

step "4. Protect a disk"
# The edits the guide asks for: the disk (named "data", as nbd-client asks
# for it) in place of the example disks, and the receiver's address.
# Everything else stays as shipped.
sed -i '/^\[\[tracker\.disk\]\]/,$d' /etc/tidemark/tracker.toml
cat >> /etc/tidemark/tracker.toml <<EOF
[[tracker.disk]]
name = "data"
path = "$data"
EOF
sed -i 's/^receiver = .*/receiver = "127.0.0.1:7480"/' /etc/tidemark/shipper.toml
line='tidemark config check /etc/tidemark/tracker.toml'
guide "$line"; ok "$line"
line='tidemark config check /etc/tidemark/shipper.toml'
guide "$line"; ok "$line"
line='modprobe nbd'
guide "$line"
[ -b /dev/nbd0 ] || fail "no /dev/nbd0 after modprobe nbd"
ok "$line"
line='systemctl start tidemark-tracker tidemark-shipper'
guide "$line"
expect_active tidemark-tracker tidemark-shipper
[ -S /run/tidemark/nbd.sock ] || fail "the tracker is active but /run/tidemark/nbd.sock is not there"
ok "$line"
line='nbd-client -unix /run/tidemark/nbd.sock /dev/nbd0 -N data -b 4096'
guide "$line"
[ "$(blockdev --getsize64 /dev/nbd0)" = "$(blockdev --getsize64 "$data")" ] ||
    fail "/dev/nbd0 is not the size of the protected disk"
ok "$line"
# "Mount /dev/nbd0, not the disk underneath."
mkfs.ext4 -q /dev/nbd0 || fail "mkfs.ext4 /dev/nbd0"
mkdir -p /srv/db && mount /dev/nbd0 /srv/db || fail "mount /dev/nbd0 /srv/db"
head -c 8M /dev/urandom > /srv/db/before-mark || fail "writing to /srv/db"
sync

step "5. Watch it"
wait_caught_up
line='tidemark status'
guide_out "$line"
grep -q data <<<"$out" || fail "\`$line\` does not show the disk"
ok "$line"
line='tidemark status --json'
guide_out "$line"
grep -q '"data"' <<<"$out" || fail "\`$line\` does not show the disk"
ok "$line"
line='tidemark shipper status --log-dir /var/lib/tidemark/log'
guide "$line"; ok "$line"
line='curl -s http://127.0.0.1:9722/metrics'
guide_quiet "$line"
grep '^tidemark_' <<<"$out" | head -n 5
grep -q '^tidemark_' <<<"$out" || fail "\`$line\` returned no tidemark_ metric"
ok "$line"
line="tidemark points --data-dir $replicas --host $host"
guide_out "$line"
[ -n "$out" ] || fail "no recovery point"
ok "$line"

step "6. Take application-consistent points"
line='tidemark mark nightly --app-consistent --config /etc/tidemark/tracker.toml --freeze /srv/db --timeout 30s'
guide "$line"
wait_caught_up
tidemark points --data-dir "$replicas" --host "$host" --json | jq -e -s 'any(.label == "nightly")' > /dev/null ||
    fail "no point named nightly at the receiver"
ok "$line"

step "7. Test a failover"
line="tidemark test-failover start --data-dir $replicas --host $host --point latest --socket /run/tidemark/test-failover.sock"
echo "TIDEMARK-VM-RUN: $line"
# Job control: the test failover runs in its own process group and, as
# in a terminal, Ctrl-C (SIGINT) reaches it.
set -m
bash -c "exec $line" > /tmp/test-failover.out 2>&1 &
test_pid=$!
set +m
for _ in $(seq 120); do grep -q '^ready' /tmp/test-failover.out && break; sleep 0.5; done
cat /tmp/test-failover.out
grep -q '^ready' /tmp/test-failover.out || fail "the test failover did not start"
nbd-client -unix /run/tidemark/test-failover.sock /dev/nbd1 -N data -b 4096 || fail "nbd-client on the test failover"
mkdir -p /mnt/test-failover
mount /dev/nbd1 /mnt/test-failover || fail "mounting the test failover"
cmp /srv/db/before-mark /mnt/test-failover/before-mark || fail "the test failover does not hold the file written before the point"
echo "written by the test" > /mnt/test-failover/test-write || fail "writing to the test failover"
umount /mnt/test-failover && nbd-client -d /dev/nbd1 || fail "detaching the test failover"
# Replication goes on meanwhile.
head -c 4M /dev/urandom > /srv/db/during-test && sync
wait_caught_up
kill -INT "$test_pid"
wait "$test_pid" || fail "the test failover exited with status $? after Ctrl-C"
cat /tmp/test-failover.out
[ ! -e /run/tidemark/test-failover.sock ] || fail "the test failover left its socket"
ok "$line"
line="tidemark test-failover cleanup --data-dir $replicas --host $host"
guide "$line"; ok "$line"

step "8. Fail over"
umount /srv/db || fail "umount /srv/db"
nbd-client -d /dev/nbd0 || fail "nbd-client -d /dev/nbd0"
line="tidemark failover --planned --data-dir $replicas --host $host --to /srv/failover"
guide_out "$line"
grep -q 'nothing was lost' <<<"$out" || fail "the planned failover does not say nothing was lost"
# The protected host was stopped through its shipper.
expect_inactive tidemark-tracker
cmp /srv/failover/data.img "$data" || fail "the planned failover's image differs from the protected disk"
ok "$line"
line='systemctl stop tidemark-receiver'
guide "$line"
expect_inactive tidemark-receiver
ok "$line"
# The unplanned failover writes to the same place: clear the planned one.
rm -r /srv/failover
line="tidemark failover --data-dir $replicas --host $host --point latest --to /srv/failover"
guide "$line"
cmp /srv/failover/data.img "$data" || fail "the failover to the latest point differs from the protected disk"
ok "$line"

step "10. Upgrade and uninstall"
# Protection running again, so the upgrade meets a running tracker.
systemctl start tidemark-receiver tidemark-tracker || fail "restarting the receiver and tracker"
expect_active tidemark-tracker tidemark-shipper tidemark-receiver
tracker_pid=$(systemctl show -P MainPID tidemark-tracker)
shipper_pid=$(systemctl show -P MainPID tidemark-shipper)
cd /root/debs || fail "no /root/debs"
echo "# edited by the admin" >> /etc/tidemark/tracker.toml
line='dpkg -i tidemark-common_*.deb tidemark-agent_*.deb'
guide "$line"
expect_active tidemark-tracker tidemark-shipper
[ "$(systemctl show -P MainPID tidemark-tracker)" = "$tracker_pid" ] || fail "the upgrade restarted the tracker"
grep -q '^# edited by the admin' /etc/tidemark/tracker.toml || fail "the upgrade lost the edited tracker.toml"
ok "$line"
shipper_pid=$(systemctl show -P MainPID tidemark-shipper)
line='systemctl restart tidemark-shipper'
guide "$line"
expect_active tidemark-shipper
[ "$(systemctl show -P MainPID tidemark-shipper)" != "$shipper_pid" ] || fail "the shipper was not restarted"
ok "$line"
# The replica site's package depends on tidemark-common too: on this one
# machine it goes first (dr$ dpkg -r tidemark-receiver).
dpkg -r tidemark-receiver || fail "dpkg -r tidemark-receiver"
expect_inactive tidemark-receiver
line='dpkg -r tidemark-agent tidemark-common'
guide "$line"
expect_inactive tidemark-tracker tidemark-shipper
! pgrep -x tidemark || fail "tidemark processes are left after the packages' removal"
[ -e /etc/tidemark/tracker.toml ] || fail "dpkg -r removed the configs"
ok "$line"
dpkg --purge tidemark-receiver || fail "dpkg --purge tidemark-receiver"
line='dpkg --purge tidemark-agent tidemark-common'
guide "$line"
[ ! -e /etc/tidemark/tracker.toml ] || fail "the purge left /etc/tidemark/tracker.toml"
[ ! -e /etc/systemd/system/multi-user.target.wants/tidemark-tracker.service ] || fail "tidemark-tracker is still enabled after the purge"
! dpkg-query -W -f '${Package} ${db:Status-Abbrev}\n' | grep tidemark || fail "dpkg still knows a tidemark package"
ok "$line"

echo "TIDEMARK-VM-PASS"
finish
