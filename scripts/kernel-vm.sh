#!/usr/bin/env bash
# The kernel test harness: runs a scenario script inside a real Debian kernel
# booted under qemu (TCG), for what the host kernel cannot do (kernel NBD
# client, device-mapper, ublk, netem). See shared/TESTBED.md, "A real Linux
# kernel ... under qemu", for the measured recipe this follows.
#
#   scripts/kernel-vm.sh install
#       qemu-system-x86 (from bookworm-backports), busybox-static, kmod,
#       nbd-client and the host tools copied into the guest (jq among them:
#       scenarios read the CLI's --json). Idempotent.
#   scripts/kernel-vm.sh kernel
#       Downloads trixie-backports' cloud kernel (TIDEMARK_VM_KERNEL_SUITE:
#       another suite) and unpacks it into the cache
#       (${TIDEMARK_VM_CACHE:-target/kernel-vm}); prints its folder. Once
#       cached, nothing is fetched again: delete the cache to update.
#   scripts/kernel-vm.sh run SCENARIO.sh [--bin PATH]... [--env NAME=VALUE]...
#                                        [--timeout SECS] [--console FILE]
#       Boots the kernel with an initramfs whose /init runs SCENARIO.sh (a
#       busybox sh script; scripts/vm-scenarios/guest-lib.sh, the steps
#       scenarios share, is at /guest-lib.sh) and powers off. The scenario prints
#       `TIDEMARK-VM-PASS` when it succeeded or `TIDEMARK-VM-FAIL: reason`;
#       exit status 0 only on PASS. --bin copies a host binary (and its
#       libraries) to the guest's /usr/local/bin; --env exports a variable to
#       the scenario; --console keeps the guest console in FILE (it is
#       printed here on failure anyway). The guest reaches the host's
#       127.0.0.1 at 10.0.2.2 (qemu user network); nothing else is bound.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${TIDEMARK_VM_CACHE:-$repo/target/kernel-vm}
backports=bookworm-backports
backports_source=/etc/apt/sources.list.d/$backports.sources

# Modules the scenarios may use; their dependencies come along. Missing ones
# (or built-in ones) are skipped with a note, so one kernel config change
# does not break every scenario.
modules=(virtio_pci virtio_net nbd loop dm-mod dm-log-writes dm-era dm-snapshot
         dm-delay dm-flakey ublk_drv sch_netem ext4 crc32c_generic)
# Host tools copied into the guest with their libraries: busybox's mke2fs
# and tc are too limited, so the real ones are called in the guest.
guest_tools=(mke2fs mkfs.ext4 e2fsck fsck.ext4 debugfs resize2fs dmsetup nbd-client tc jq)

die() { echo "kernel-vm: $*" >&2; exit 2; }
note() { echo "kernel-vm: $*" >&2; }

# The URI of the machine's own bookworm mirror, so backports come from the
# same place as everything else.
mirror_uri() {
    local uri=""
    if [ -r /etc/apt/sources.list.d/debian.sources ]; then
        # deb822: the stanza whose Suites has plain "bookworm".
        uri=$(awk -v RS= '/(^|\n)Suites:([^\n]* )?bookworm( |\n|$)/ {
                  if (match($0, /(^|\n)URIs: *[^ \n]+/)) {
                      s = substr($0, RSTART, RLENGTH); sub(/^\n?URIs: */, "", s); print s; exit
                  } }' /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$uri" ] && [ -r /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list)
    fi
    [ -n "$uri" ] || die "cannot find the bookworm mirror in /etc/apt/sources.list{,.d/debian.sources}"
    echo "$uri"
}

# Adds the bookworm-backports source once. Returns 0 if it was added (the
# package lists then need an update), 1 if it was already there.
add_backports_source() {
    if grep -rqs -- "$backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return 1
    fi
    local uri
    uri=$(mirror_uri)
    note "adding the $backports apt source ($uri)"
    cat > "$backports_source" <<EOF
Types: deb
URIs: $uri
Suites: $backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    return 0
}

apt_update() { note "apt-get update"; apt-get update -qq >/dev/null; }

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

cmd_install() {
    local missing=() pkg
    # qemu-system-x86 must come from backports: bookworm's own 7.2 would
    # replace the preinstalled qemu-utils 10.x (the packages conflict).
    installed qemu-system-x86 || missing+=(qemu-system-x86)
    local plain=()
    for pkg in busybox-static kmod nbd-client e2fsprogs dmsetup iproute2 jq; do
        installed "$pkg" || plain+=("$pkg")
    done
    if [ ${#missing[@]} -eq 0 ] && [ ${#plain[@]} -eq 0 ]; then
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    # A new source needs an update first; with an old one the lists may
    # still be stale, so a failed install is retried after an update.
    if add_backports_source; then apt_update; fi
    if [ ${#missing[@]} -gt 0 ]; then
        note "installing qemu-system-x86 from $backports"
        apt-get install -y -qq -t "$backports" qemu-system-x86 >/dev/null 2>&1 || {
            apt_update && apt-get install -y -qq -t "$backports" qemu-system-x86 >/dev/null
        }
    fi
    if [ ${#plain[@]} -gt 0 ]; then
        note "installing ${plain[*]}"
        apt-get install -y -qq "${plain[@]}" >/dev/null 2>&1 || {
            apt_update && apt-get install -y -qq "${plain[@]}" >/dev/null
        }
    fi
}

# The guest kernel comes from $kernel_suite (trixie-backports' cloud kernel
# by default). bookworm-backports' 6.12 was used before; its ublk driver was
# seen to oops (a NULL dereference in io_ring_exit_work) or livelock a
# kworker when a ublk server exited with requests in flight, in 3 of 4 runs
# of the ublk restart scenario under load. TIDEMARK_VM_KERNEL_SUITE picks
# another suite of the same mirror.
kernel_suite=${TIDEMARK_VM_KERNEL_SUITE:-trixie-backports}

# apt with a source list, package lists and archives of its own under the
# cache: the kernel's suite is never added to the host's sources, so nothing
# the host installs can come from it.
kernel_apt=()
kernel_apt_setup() {
    local dir=$cache/apt uri
    uri=$(mirror_uri)
    mkdir -p "$dir/lists/partial" "$dir/archives/partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $kernel_suite main" \
        > "$dir/sources.list"
    kernel_apt=(-o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
                -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir"
                -o APT::Get::List-Cleanup=0)
    note "apt-get update ($kernel_suite, for the guest kernel)"
    apt-get "${kernel_apt[@]}" update -qq >/dev/null ||
        die "apt-get update of $kernel_suite failed"
}

# The versioned kernel package behind the suite's linux-image-cloud-amd64
# (e.g. linux-image-7.3.4+deb13-cloud-amd64); the ABI number changes with
# updates, so it is always looked up.
kernel_package() {
    apt-cache "${kernel_apt[@]}" depends linux-image-cloud-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-.*-cloud-amd64$/ { print $2; exit }'
}

# The packages holding that kernel: the image itself and, in newer kernels,
# the linux-binary-KVER (vmlinuz) and linux-modules-KVER it depends on.
kernel_packages() {
    local pkg=$1 kver=$2
    echo "$pkg"
    apt-cache "${kernel_apt[@]}" depends "$pkg" 2>/dev/null |
        awk -v k="$kver" '$1 == "Depends:" && ($2 == "linux-binary-" k || $2 == "linux-modules-" k) { print $2 }'
}

# Prints the cached kernel folder (holding boot/vmlinuz-KVER and
# lib/modules/KVER with modules.dep); fetches it first if needed.
cmd_kernel() {
    mkdir -p "$cache"
    # One fetch at a time, when several test runs start together.
    exec 9>"$cache/.lock"
    flock 9
    if [ -e "$cache/current/.complete" ] &&
        [ "$(cat "$cache/current/.suite" 2>/dev/null)" = "$kernel_suite" ]; then
        readlink -f "$cache/current"
        return 0
    fi
    kernel_apt_setup
    local pkg
    pkg=$(kernel_package)
    [ -n "$pkg" ] || die "cannot resolve linux-image-cloud-amd64 in $kernel_suite"
    local kver=${pkg#linux-image-}
    local pkgs
    mapfile -t pkgs < <(kernel_packages "$pkg" "$kver")
    note "fetching ${pkgs[*]}"
    local work
    work=$(mktemp -d "$cache/fetch.XXXXXX")
    # apt-get download runs as the _apt user where it can; let it write.
    chmod 0777 "$work"
    (cd "$work" && apt-get "${kernel_apt[@]}" download -qq "${pkgs[@]}" >/dev/null) ||
        { rm -rf "$work"; die "apt-get download ${pkgs[*]} failed"; }
    mkdir "$work/root"
    local deb
    for deb in "$work"/*.deb; do dpkg -x "$deb" "$work/root"; done
    rm -f "$work"/*.deb
    # One layout whatever the package's: boot/vmlinuz-KVER, lib/modules/KVER.
    local r=$work/root
    if [ ! -f "$r/boot/vmlinuz-$kver" ] && [ -f "$r/usr/lib/modules/$kver/vmlinuz" ]; then
        mkdir -p "$r/boot" && mv "$r/usr/lib/modules/$kver/vmlinuz" "$r/boot/vmlinuz-$kver"
    fi
    if [ ! -d "$r/lib/modules/$kver" ] && [ -d "$r/usr/lib/modules/$kver" ]; then
        rm -rf "$r/lib" && mkdir -p "$r/lib" && mv "$r/usr/lib/modules" "$r/lib/modules"
    fi
    [ -f "$r/boot/vmlinuz-$kver" ] || { rm -rf "$work"; die "${pkgs[*]}: no vmlinuz for $kver"; }
    [ -d "$r/lib/modules/$kver/kernel" ] || { rm -rf "$work"; die "${pkgs[*]}: no modules for $kver"; }
    # Debian generates modules.dep at install time, which never happens here
    # (newer packages ship no modules.builtin: built-in modules then read as
    # absent and are left out of the initramfs, which is harmless).
    depmod -b "$r" "$kver" 2>/dev/null
    echo "$kernel_suite" > "$r/.suite"
    touch "$r/.complete"
    rm -rf "${cache:?}/$kver"
    mv "$r" "$cache/$kver"
    rm -rf "$work"
    ln -sfn "$kver" "$cache/current"
    readlink -f "$cache/current"
}

# Copies a host file to the same path under the initramfs root, through
# the root's own /lib -> usr/lib style links.
copy_into() {
    local src=$1 root=$2 dir
    dir=$(readlink -f "$(dirname "$src")")
    mkdir -p "$root$dir"
    cp -L "$src" "$root$dir/$(basename "$src")"
}

# Copies the shared libraries a dynamic executable needs (ldd's list).
copy_libraries() {
    local bin=$1 root=$2 lib
    # A static binary makes ldd fail: it needs nothing.
    for lib in $(ldd "$bin" 2>/dev/null | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }'); do
        [ -e "$root$(readlink -f "$(dirname "$lib")")/$(basename "$lib")" ] || copy_into "$lib" "$root"
    done
}

# The guest's /init: mounts, modules, network, the scenario, poweroff. PID 1
# must never exit (that panics the kernel), so every step is allowed to fail
# and the scenario's outcome is only reported.
write_init() {
    cat > "$1" <<'EOF'
#!/bin/sh
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t devtmpfs devtmpfs /dev
# The initramfs has no /dev/console node, so the kernel gave init no
# stdio; take the console now that devtmpfs provides it.
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
echo "TIDEMARK-VM-BOOTED uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r)"
while read -r ko params; do
    insmod "$ko" $params || echo "TIDEMARK-VM-NOTE: insmod $ko failed"
done < /etc/tidemark-vm/modules
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 ||
    echo "TIDEMARK-VM-NOTE: the network did not come up"
export DM_DISABLE_UDEV=1
. /etc/tidemark-vm/env
cd /tmp
sh /scenario.sh
rc=$?
[ "$rc" -eq 0 ] || echo "TIDEMARK-VM-FAIL: the scenario exited with status $rc"
echo "TIDEMARK-VM-DONE status=$rc uptime=$(cut -d' ' -f1 /proc/uptime)"
sync
poweroff -f
EOF
    chmod 0755 "$1"
}

# Single-quotes a value for sh.
sh_quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

# Builds the initramfs for one run into $1/initrd.cpio.gz.
build_initramfs() {
    local work=$1 kdir=$2 kver=$3 scenario=$4
    shift 4
    local root=$work/root
    mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib,usr/lib64,usr/local/bin,dev,proc,sys,tmp,run,mnt,root,etc/tidemark-vm}
    # The same merged-/usr layout as the host, so ldd's paths fit as they are.
    ln -s usr/bin "$root/bin"; ln -s usr/sbin "$root/sbin"
    ln -s usr/lib "$root/lib"; ln -s usr/lib64 "$root/lib64"

    local tool src
    for tool in "${guest_tools[@]}"; do
        src=$(command -v "$tool") || die "$tool is not installed (run: $0 install)"
        cp -L "$src" "$root/usr/sbin/$tool"
        copy_libraries "$src" "$root"
    done
    [ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"
    for src in "${bins[@]}"; do
        [ -x "$src" ] || die "--bin $src: not an executable file"
        cp -L "$src" "$root/usr/local/bin/"
        copy_libraries "$src" "$root"
    done

    # busybox last: its applets only fill the names no real tool took.
    cp /bin/busybox "$root/usr/bin/busybox"
    local applet
    for applet in $(/bin/busybox --list-full); do
        [ -e "$root/$applet" ] || [ -L "$root/$applet" ] || ln -s /usr/bin/busybox "$root/$applet"
    done

    # Modules in insmod order (dependencies first), decompressed because
    # busybox insmod reads plain ELF only.
    local module line ko dest params
    : > "$root/etc/tidemark-vm/modules"
    for module in "${modules[@]}"; do
        if ! line=$(modprobe -d "$kdir" -S "$kver" --show-depends "$module" 2>/dev/null); then
            note "module $module is not in kernel $kver; left out"
            continue
        fi
        # Lines are "insmod PATH [PARAMS]" (parameters from modprobe.d
        # files, kept) or "builtin NAME" (nothing to load).
        while read -r _ ko params; do
            case $ko in /*) ;; *) continue ;; esac
            dest=${ko#"$kdir"}
            dest=${dest%.xz}; dest=${dest%.zst}; dest=${dest%.gz}
            awk -v d="$dest" '$1 == d { found = 1 } END { exit !found }' \
                "$root/etc/tidemark-vm/modules" && continue
            mkdir -p "$root$(dirname "$dest")"
            case $ko in
                *.xz) xz -dc "$ko" > "$root$dest" ;;
                *.zst) zstd -qdc "$ko" > "$root$dest" ;;
                *.gz) gzip -dc "$ko" > "$root$dest" ;;
                *) cp "$ko" "$root$dest" ;;
            esac
            echo "$dest${params:+ $params}" >> "$root/etc/tidemark-vm/modules"
        done < <(printf '%s\n' "$line" | grep '^insmod ' || true)
    done

    local kv
    : > "$root/etc/tidemark-vm/env"
    for kv in "${envs[@]}"; do
        echo "export ${kv%%=*}=$(sh_quote "${kv#*=}")" >> "$root/etc/tidemark-vm/env"
    done
    cp "$scenario" "$root/scenario.sh"
    cp "$repo/scripts/vm-scenarios/guest-lib.sh" "$root/guest-lib.sh"
    write_init "$root/init"
    (cd "$root" && find . -mindepth 1 | /bin/busybox cpio -o -H newc 2>/dev/null) | gzip -1 > "$work/initrd.cpio.gz"
}

cmd_run() {
    [ $# -ge 1 ] || die "usage: $0 run SCENARIO.sh [--bin PATH]... [--env NAME=VALUE]... [--timeout SECS] [--console FILE]"
    local scenario=$1 timeout=300 console=""
    shift
    [ -f "$scenario" ] || die "no scenario $scenario"
    bins=(); envs=()
    while [ $# -gt 0 ]; do
        case $1 in
            --bin) bins+=("$(readlink -f "${2:?--bin needs a path}")"); shift 2 ;;
            --env)
                [[ ${2:-} =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env needs NAME=VALUE"
                envs+=("$2"); shift 2 ;;
            --timeout) timeout=${2:?--timeout needs seconds}; shift 2 ;;
            --console) console=${2:?--console needs a file}; shift 2 ;;
            *) die "unknown option $1" ;;
        esac
    done
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is not installed (run: $0 install)"
    [ -x /bin/busybox ] || die "busybox is not installed (run: $0 install)"

    local kdir kver
    kdir=$(cmd_kernel)
    kver=$(basename "$kdir")

    # Global, for the EXIT trap.
    work=$(mktemp -d "${TMPDIR:-/tmp}/tidemark-vm.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    local t0=$SECONDS
    build_initramfs "$work" "$kdir" "$kver" "$scenario"
    note "initramfs built in $((SECONDS - t0)) s ($(du -k "$work/initrd.cpio.gz" | cut -f1) KiB), booting $kver"
    [ -n "$console" ] || console=$work/console.log

    # A hard time limit: a hung guest (or kernel) must not hang the caller.
    t0=$SECONDS
    local rc=0
    timeout --kill-after=10 "$timeout" \
        qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m 1024 -smp 2 \
            -nographic -no-reboot \
            -kernel "$kdir/boot/vmlinuz-$kver" -initrd "$work/initrd.cpio.gz" \
            -append "console=ttyS0 panic=-1 quiet" \
            -netdev user,id=n0 -device virtio-net-pci,netdev=n0 \
            < /dev/null > "$console" 2>&1 || rc=$?
    local took=$((SECONDS - t0))

    # The serial console ends lines with \r\n.
    local verdict
    verdict=$(tr -d '\r' < "$console" | grep -a -E '^TIDEMARK-VM-(PASS|FAIL)' || true)
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        verdict=$(printf '%s\n' "TIDEMARK-VM-FAIL: timed out after $timeout s" "$verdict" | sed '/^$/d')
    fi
    if grep -q '^TIDEMARK-VM-PASS' <<<"$verdict" && ! grep -q '^TIDEMARK-VM-FAIL' <<<"$verdict"; then
        tr -d '\r' < "$console" | grep -a '^TIDEMARK-VM-' || true
        note "PASS: $(basename "$scenario") in $took s"
        return 0
    fi
    echo "----- guest console ($console) -----"
    tr -d '\r' < "$console"
    echo "-----"
    [ -n "$verdict" ] || verdict="no TIDEMARK-VM-PASS marker (qemu exit status $rc)"
    note "FAIL: $(basename "$scenario") after $took s: $verdict"
    return 1
}

case ${1:-} in
    install) cmd_install ;;
    kernel) cmd_kernel ;;
    run) shift; cmd_run "$@" ;;
    *) die "usage: $0 install | kernel | run SCENARIO.sh [--bin PATH]... [--env NAME=VALUE]... [--timeout SECS] [--console FILE]" ;;
esac
