#!/bin/sh
# qemu-guest-agent's fsfreeze hook in the Debian guest of
# tests/tests/vm_guests.rs: called with "freeze" before the agent freezes
# the file systems and "thaw" after it thawed them; tells the console.
echo "TIDEMARK-GUEST-FSFREEZE $1" >/dev/ttyS0
