# Shared steps of the guest scenarios (busybox sh). scripts/kernel-vm.sh
# puts this file at /guest-lib.sh in every guest; a scenario sources it
# (`. /guest-lib.sh`) after it has set $dir (its work folder) and defined
# fail() (print TIDEMARK-VM-FAIL with its own diagnostics, clean up, exit 1).

# report_failure DMESG_PATTERN MESSAGE...: the fail() of a scenario built on
# serve_tracker and start_writer: TIDEMARK-VM-FAIL: MESSAGE, the last lines
# of every $dir/tracker*.err and of the kernel messages matching
# DMESG_PATTERN (grep -E, any case), then the writer is stopped, the
# tracker killed, and the scenario exits 1.
report_failure() {
    pattern=$1
    shift
    echo "TIDEMARK-VM-FAIL: $*"
    for f in "$dir"/tracker*.err; do
        [ -f "$f" ] && sed "s|^|TIDEMARK-VM-INFO $(basename "$f"): |" "$f" | tail -n 20
    done
    dmesg | grep -i -E "$pattern" | tail -n 20 | sed 's/^/TIDEMARK-VM-INFO dmesg: /'
    [ -n "$writer" ] && touch "$dir/stop"
    [ -n "$tracker" ] && kill -9 "$tracker" 2>/dev/null
    exit 1
}

# Milliseconds since boot, from /proc/uptime (10 ms resolution), no fork.
now_ms() {
    read -r up _ < /proc/uptime
    echo $(( ${up%.*} * 1000 + 1${up#*.} * 10 - 1000 ))
}

# write_tracker_toml DISK LOG_LIMIT [TABLES]: $dir/tracker.toml for one disk
# named "disk" at DISK, its log in $dir/log (at most LOG_LIMIT, 16 MiB
# segments, 4 MiB announced as the largest request), its sockets in $dir,
# metrics on a free loopback port; TABLES (TOML, e.g. [tracker.attach])
# go between the [tracker] keys and the disk.
write_tracker_toml() {
    cat > "$dir/tracker.toml" <<EOF
[tracker]
log-dir = "$dir/log"
socket = "$dir/nbd.sock"
control-socket = "$dir/tracker.ctl"
metrics-listen = "127.0.0.1:0"
log-size-limit = "$2"
segment-size = "16MiB"
max-block-size = "4MiB"
${3:-}
[[tracker.disk]]
name = "disk"
path = "$1"
EOF
}

# serve_tracker NAME READY FLAGS...: starts `tidemark tracker serve --config
# $dir/tracker.toml FLAGS...`, its output in $dir/NAME.out and $dir/NAME.err,
# and waits (30 s at most) until a line of its stdout starts with READY.
# Sets $tracker (its pid) and $ready_line (that line).
serve_tracker() {
    name=$1 ready=$2
    shift 2
    tidemark tracker serve --config "$dir/tracker.toml" "$@" \
        > "$dir/$name.out" 2> "$dir/$name.err" &
    tracker=$!
    i=0
    until grep -q "^$ready" "$dir/$name.out" 2>/dev/null; do
        kill -0 "$tracker" 2>/dev/null || fail "$name exited before it printed \"$ready\""
        i=$((i + 1))
        [ $i -gt 600 ] && fail "$name did not print \"$ready\" within 30 s"
        usleep 50000
    done
    ready_line=$(grep "^$ready" "$dir/$name.out" | head -n 1)
}

# start_writer MOUNT: in the background, fsynced 256 KiB files written
# round robin in MOUNT until stop_writer, counting failures and the longest
# single write (a write in flight across a tracker restart waits for it).
# Sets $writer (its pid).
start_writer() {
    rm -f "$dir/stop" "$dir/writer.result" "$dir/writer.ok"
    (
        ok=0 errors=0 longest=0 i=0
        while [ ! -e "$dir/stop" ]; do
            s=$(now_ms)
            if dd if=/dev/urandom of="$1/w$((i % 16))" bs=64k count=4 conv=fsync 2>>"$dir/dd.err"; then
                ok=$((ok + 1))
            else
                errors=$((errors + 1))
            fi
            took=$(( $(now_ms) - s ))
            [ $took -gt $longest ] && longest=$took
            i=$((i + 1))
            echo "$ok" > "$dir/writer.ok"
        done
        echo "ok=$ok errors=$errors longest-write-ms=$longest" > "$dir/writer.result"
    ) &
    writer=$!
}

# The writer's successful writes so far.
writes() { cat "$dir/writer.ok" 2>/dev/null || echo 0; }

# keep_writing N: waits WRITE_SECS, then until the writer has more than N
# successful writes (60 s at most).
keep_writing() {
    sleep "$WRITE_SECS"
    i=0
    while [ "$(writes)" -le "$1" ]; do
        i=$((i + 1))
        [ $i -gt 600 ] && fail "the writer made no progress for 60 s (at $(writes) writes)"
        usleep 100000
    done
}

# stop_writer: stops the writer and waits for it; sets $writer_result
# ("ok=N errors=N longest-write-ms=N").
stop_writer() {
    touch "$dir/stop"
    wait "$writer"
    writer=""
    writer_result=$(cat "$dir/writer.result")
}

# log_replays_to IMAGE: the tracker's log ($dir/log) verifies (`tidemark
# log check`) and, replayed onto a blank image of IMAGE's size, gives IMAGE
# byte for byte - except in the ranges the log marks resync-needed. Those
# are the extents a SIGKILLed tracker had hot: writes acknowledged while
# their records were still in the tracker's buffer are, by design, in the
# activity map only, and the shipper's checksum resync takes those ranges
# from the source. The check does the same (copies them from IMAGE) and
# says how many bytes that was, then compares every byte.
log_replays_to() {
    tidemark log check "$dir/log" > "$dir/check.out" 2>&1 || {
        sed 's/^/TIDEMARK-VM-INFO log check: /' "$dir/check.out"
        fail "tidemark log check failed"
    }
    echo "TIDEMARK-VM-INFO log check: $(tail -n 1 "$dir/check.out")"
    rm -f "$dir/replayed.img"
    truncate -s "$(stat -c %s "$1")" "$dir/replayed.img" || fail "truncate replayed.img"
    tidemark log replay --json "$dir/log" --onto "$dir/replayed.img" > "$dir/replay.json" 2> "$dir/replay.err" || {
        sed 's/^/TIDEMARK-VM-INFO log replay: /' "$dir/replay.err"
        fail "tidemark log replay failed"
    }
    echo "TIDEMARK-VM-INFO log replay: $(jq -c '{applied, barriers, last_seq}' "$dir/replay.json")"
    ranges=$(jq -r '.resync_needed[] | "\(.[0]):\(.[1])"' "$dir/replay.json") ||
        fail "cannot read the resync-needed ranges of the replay's summary"
    from_source=0
    for range in $ranges; do
        offset=${range%:*}
        length=${range#*:}
        [ $((offset % 512)) -eq 0 ] && [ $((length % 512)) -eq 0 ] ||
            fail "resync-needed range $offset+$length is not in 512-byte sectors"
        dd if="$1" of="$dir/replayed.img" bs=512 skip=$((offset / 512)) seek=$((offset / 512)) \
            count=$((length / 512)) conv=notrunc 2>/dev/null || fail "copying resync-needed range $offset+$length"
        from_source=$((from_source + length))
    done
    echo "TIDEMARK-VM-INFO log replay: $from_source bytes in resync-needed ranges taken from the source"
    cmp "$1" "$dir/replayed.img" || fail "the replayed log differs from $1"
}

# grow_online IMAGE DEV MNT GROW_MB: the disk grows under the ext4 mounted
# at MNT on the tracker's kernel device DEV while the writer runs. What the
# old size leaves free is taken first (fallocate: no data written) so that
# a file written after the growth fits only in the new space. Then the
# backing IMAGE grows by GROW_MB, `tidemark tracker resize` records and
# serves the growth and tells DEV (its reply must say DEV grew), DEV has
# the new size at once (sysfs and blockdev), resize2fs grows the mounted
# ext4 online, and 8 MiB written and fsynced into it read back. Sets
# $grow_result ("grow-before=N grow-after=N grow-ms=N resize2fs-ms=N":
# DEV's bytes before and after, the resize command's and resize2fs's
# milliseconds).
grow_online() {
    gname=${2#/dev/}
    g_before=$(( $(cat "/sys/block/$gname/size") * 512 ))
    avail_kb=$(df -kP "$3" | awk 'NR == 2 { print $4 }')
    fs_kb=$(df -kP "$3" | awk 'NR == 2 { print $2 }')
    fallocate -l $(( (avail_kb - 2048) * 1024 )) "$3/filler" || fail "fallocate of the old free space"
    left_kb=$(df -kP "$3" | awk 'NR == 2 { print $4 }')
    [ "$left_kb" -lt 8192 ] || fail "$left_kb KiB still free after the filler: the new file would fit in the old size"
    # (busybox truncate takes no relative size)
    truncate -s $(( $(stat -c %s "$1") + ($4 << 20) )) "$1" || fail "growing $1"
    g_t=$(now_ms)
    tidemark tracker resize --disk disk --control-socket "$dir/tracker.ctl" --json \
        > "$dir/resize.json" 2> "$dir/resize.err" || {
        sed 's/^/TIDEMARK-VM-INFO resize: /' "$dir/resize.err"
        fail "tidemark tracker resize failed"
    }
    grow_ms=$(( $(now_ms) - g_t ))
    echo "TIDEMARK-VM-INFO resize: $(jq -c . "$dir/resize.json")"
    grown=$(jq -r --arg d "$2" '.kernel[] | select(.device == $d) | .grown' "$dir/resize.json")
    [ "$grown" = true ] || fail "the tracker did not grow $2: $(jq -c .kernel "$dir/resize.json")"
    g_after=$(( $(cat "/sys/block/$gname/size") * 512 ))
    [ "$g_after" -eq $(( g_before + ($4 << 20) )) ] ||
        fail "$2 has $g_after bytes after the resize, not $g_before + $4 MiB"
    [ "$(blockdev --getsize64 "$2")" = "$g_after" ] || fail "blockdev --getsize64 $2 disagrees with sysfs"
    g_t=$(now_ms)
    resize2fs "$2" > "$dir/resize2fs.out" 2>&1 || {
        sed 's/^/TIDEMARK-VM-INFO resize2fs: /' "$dir/resize2fs.out"
        fail "resize2fs $2 (online) failed"
    }
    resize2fs_ms=$(( $(now_ms) - g_t ))
    fs_kb_after=$(df -kP "$3" | awk 'NR == 2 { print $2 }')
    echo "TIDEMARK-VM-INFO grown online: $2 $g_before -> $g_after bytes in $grow_ms ms; ext4 $fs_kb -> $fs_kb_after KiB, resize2fs $resize2fs_ms ms; $(tail -n 1 "$dir/resize2fs.out")"
    [ "$fs_kb_after" -gt "$fs_kb" ] || fail "the ext4 did not grow ($fs_kb -> $fs_kb_after KiB)"
    dd if=/dev/urandom of="$3/grown" bs=1M count=8 conv=fsync 2>> "$dir/dd.err" ||
        fail "writing 8 MiB into the new space failed"
    sha256sum "$3/grown" > "$dir/grown.sums"
    echo 3 > /proc/sys/vm/drop_caches
    sha256sum -c "$dir/grown.sums" > /dev/null || fail "the file in the new space reads back different"
    rm -f "$3/filler"
    grow_result="grow-before=$g_before grow-after=$g_after grow-ms=$grow_ms resize2fs-ms=$resize2fs_ms"
}
