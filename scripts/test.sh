#!/usr/bin/env bash
# The test command: installs what the tests need (idempotently), then runs
# every test of the workspace. Tests that need a foreign tool skip with a
# message when it is missing, except under CI (CI=true), where a missing
# tool fails them: this script installs them first.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pair in "e2fsck:e2fsprogs" "python3:python3"; do
    tool=${pair%%:*}; pkg=${pair#*:}
    command -v "$tool" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "==> installing ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${need_apt[@]}" >/dev/null 2>&1 || {
        apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
    }
fi

echo "==> cargo test --workspace"
cargo test --workspace --all-targets
