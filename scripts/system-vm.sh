#!/usr/bin/env bash
# A whole Debian system under qemu (TCG): the kernel of scripts/kernel-vm.sh
# (trixie-backports' cloud kernel), a root file system made from a
# directory, and systemd as PID 1. For what only a real init shows: units
# started and stopped by systemctl, their hardening, maintainer scripts
# talking to a running systemd, udev's device names.
#
#   scripts/system-vm.sh image ROOTDIR IMAGE
#       Copies the kernel's modules into ROOTDIR (so the guest's modprobe
#       and udev load what they need) and makes IMAGE, an ext4 file
#       system holding ROOTDIR (mkfs.ext4 -d: no loop device, no mount),
#       with 1 GiB free for the guest.
#   scripts/system-vm.sh boot IMAGE [--disk FILE:SERIAL]... [--timeout SECS]
#                                   [--console FILE]
#       Boots IMAGE as the root file system (a virtio disk) through a small
#       initramfs that loads the block and ext4 modules and hands over to
#       the image's /sbin/init. --disk adds a virtio disk the guest sees as
#       /dev/disk/by-id/virtio-SERIAL. Something in the image (a unit) prints
#       `TIDEMARK-VM-PASS` or `TIDEMARK-VM-FAIL: reason` on the serial
#       console and powers off; exit status 0 only on PASS. The guest has
#       no network device: it works on its own loopback.
#   scripts/system-vm.sh initramfs OUT
#       Writes the initramfs `boot` uses to OUT and prints the kernel's
#       path: what a VM spec's [vm.kernel] names to boot a root file system
#       made by `image` (or any ext4 root on a virtio disk whose serial is
#       given as tidemark.root=SERIAL on the kernel command line, by
#       default tidemark-root) directly, e.g. from a test failover's NBD
#       export.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)

# What the initramfs loads to reach and mount the root disk; built-in ones are
# skipped.
initramfs_modules=(virtio_pci virtio_blk ext4 crc32c_generic)

die() { echo "system-vm: $*" >&2; exit 2; }
note() { echo "system-vm: $*" >&2; }

# The cached kernel folder (boot/vmlinuz-KVER, lib/modules/KVER).
kernel_dir() { "$repo/scripts/kernel-vm.sh" kernel; }

cmd_image() {
    [ $# -eq 2 ] || die "usage: $0 image ROOTDIR IMAGE"
    local root=$1 image=$2 kdir kver
    [ -x "$root/sbin/init" ] || die "$root/sbin/init is missing (install systemd-sysv in it)"
    kdir=$(kernel_dir)
    kver=$(basename "$kdir")
    mkdir -p "$root/usr/lib/modules"
    rm -rf "${root:?}/usr/lib/modules/$kver"
    cp -a "$kdir/lib/modules/$kver" "$root/usr/lib/modules/$kver"
    local used_mib
    used_mib=$(du -sm "$root" | cut -f1)
    rm -f "$image"
    mkfs.ext4 -q -F -L tidemark-root -d "$root" "$image" "$((used_mib * 12 / 10 + 1024))M"
}

# The initramfs's /init: load the modules, mount the image, hand over.
write_init() {
    cat > "$1" <<'EOF'
#!/bin/sh
export PATH=/usr/bin:/usr/sbin:/bin:/sbin
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
while read -r ko params; do
    insmod "$ko" $params || echo "TIDEMARK-VM-NOTE: insmod $ko failed"
done < /modules
mount -t sysfs sysfs /sys
mkdir -p /newroot
# The root is the virtio disk with the serial "tidemark-root" (or the
# tidemark.root= of the command line), wherever it landed among the others.
want=tidemark-root
for word in $(cat /proc/cmdline); do
    case $word in tidemark.root=*) want=${word#tidemark.root=} ;; esac
done
root=""
for _ in $(seq 50); do
    for serial in /sys/block/vd*/serial; do
        [ "$(cat "$serial" 2>/dev/null)" = "$want" ] || continue
        root=${serial%/serial}; root=/dev/${root##*/}
    done
    [ -n "$root" ] && [ -b "$root" ] && break
    sleep 0.1
done
if [ -z "$root" ] || ! mount -t ext4 -o rw "$root" /newroot; then
    echo "TIDEMARK-VM-FAIL: cannot mount the root file system (disk ${root:-with serial $want not found})"
    cat /proc/partitions
    poweroff -f
fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
EOF
    chmod 0755 "$1"
}

build_initramfs() {
    local work=$1 kdir=$2 kver=$3
    local root=$work/initramfs
    mkdir -p "$root"/{bin,dev,proc,sys,newroot}
    cp /bin/busybox "$root/bin/busybox"
    local applet
    for applet in sh mount umount insmod switch_root poweroff sleep seq mkdir cat ls; do
        ln -s busybox "$root/bin/$applet"
    done
    # Modules in insmod order, decompressed: busybox insmod reads plain ELF.
    local module ko dest params
    : > "$root/modules"
    for module in "${initramfs_modules[@]}"; do
        while read -r _ ko params; do
            case $ko in /*) ;; *) continue ;; esac
            dest=/lib/${ko##*/}
            dest=${dest%.xz}; dest=${dest%.zst}; dest=${dest%.gz}
            awk -v d="$dest" '$1 == d { found = 1 } END { exit !found }' "$root/modules" && continue
            mkdir -p "$root/lib"
            case $ko in
                *.xz) xz -dc "$ko" > "$root$dest" ;;
                *.zst) zstd -qdc "$ko" > "$root$dest" ;;
                *.gz) gzip -dc "$ko" > "$root$dest" ;;
                *) cp "$ko" "$root$dest" ;;
            esac
            echo "$dest${params:+ $params}" >> "$root/modules"
        done < <(modprobe -d "$kdir" -S "$kver" --show-depends "$module" 2>/dev/null | grep '^insmod ' || true)
    done
    write_init "$root/init"
    (cd "$root" && find . -mindepth 1 | /bin/busybox cpio -o -H newc 2>/dev/null) | gzip -1 > "$work/initrd.cpio.gz"
}

cmd_boot() {
    [ $# -ge 1 ] || die "usage: $0 boot IMAGE [--disk FILE:SERIAL]... [--timeout SECS] [--console FILE]"
    local image=$1 timeout=600 console=""
    shift
    [ -f "$image" ] || die "no image $image"
    local disks=() n=0 spec
    while [ $# -gt 0 ]; do
        case $1 in
            --disk)
                spec=${2:?--disk needs FILE:SERIAL}
                [ -f "${spec%:*}" ] || die "--disk: no file ${spec%:*}"
                n=$((n + 1))
                disks+=(-drive "file=${spec%:*},if=none,id=disk$n,format=raw,cache=unsafe"
                        -device "virtio-blk-pci,drive=disk$n,serial=${spec##*:}")
                shift 2 ;;
            --timeout) timeout=${2:?--timeout needs seconds}; shift 2 ;;
            --console) console=${2:?--console needs a file}; shift 2 ;;
            *) die "unknown option $1" ;;
        esac
    done
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is not installed (run: scripts/kernel-vm.sh install)"
    [ -x /bin/busybox ] || die "busybox is not installed (run: scripts/kernel-vm.sh install)"
    local kdir kver
    kdir=$(kernel_dir)
    kver=$(basename "$kdir")

    # Global, for the EXIT trap.
    work=$(mktemp -d "${TMPDIR:-/tmp}/tidemark-system-vm.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    build_initramfs "$work" "$kdir" "$kver"
    [ -n "$console" ] || console=$work/console.log

    local t0=$SECONDS rc=0
    note "booting $image with $kver and systemd (timeout $timeout s)"
    # A hard time limit: a hung guest must not hang the caller.
    timeout --kill-after=10 "$timeout" \
        qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m 2048 -smp 2 \
            -nographic -no-reboot -nic none \
            -kernel "$kdir/boot/vmlinuz-$kver" -initrd "$work/initrd.cpio.gz" \
            -append "console=ttyS0 panic=-1 quiet systemd.show_status=error" \
            -drive "file=$image,if=none,id=root,format=raw,cache=unsafe" \
            -device virtio-blk-pci,drive=root,serial=tidemark-root \
            "${disks[@]}" \
            < /dev/null > "$console" 2>&1 || rc=$?
    local took=$((SECONDS - t0))

    # The serial console ends lines with \r\n.
    local verdict
    verdict=$(tr -d '\r' < "$console" | grep -a -E '^TIDEMARK-VM-(PASS|FAIL)' || true)
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        verdict=$(printf '%s\n' "TIDEMARK-VM-FAIL: timed out after $timeout s" "$verdict" | sed '/^$/d')
    fi
    if grep -q '^TIDEMARK-VM-PASS' <<<"$verdict" && ! grep -q '^TIDEMARK-VM-FAIL' <<<"$verdict"; then
        note "PASS in $took s"
        return 0
    fi
    echo "----- guest console ($console) -----"
    tr -d '\r' < "$console"
    echo "-----"
    [ -n "$verdict" ] || verdict="no TIDEMARK-VM-PASS marker (qemu exit status $rc)"
    note "FAIL after $took s: $verdict"
    return 1
}

cmd_initramfs() {
    [ $# -eq 1 ] || die "usage: $0 initramfs OUT"
    [ -x /bin/busybox ] || die "busybox is not installed (run: scripts/kernel-vm.sh install)"
    local out=$1 kdir kver tmp
    kdir=$(kernel_dir)
    kver=$(basename "$kdir")
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/tidemark-initramfs.XXXXXX")
    build_initramfs "$tmp" "$kdir" "$kver"
    mv "$tmp/initrd.cpio.gz" "$out"
    rm -rf "$tmp"
    echo "$kdir/boot/vmlinuz-$kver"
}

case ${1:-} in
    image) shift; cmd_image "$@" ;;
    initramfs) shift; cmd_initramfs "$@" ;;
    boot) shift; cmd_boot "$@" ;;
    *) die "usage: $0 image ROOTDIR IMAGE | initramfs OUT | boot IMAGE [--disk FILE:SERIAL]... [--timeout SECS] [--console FILE]" ;;
esac
