#!/usr/bin/env bash
# Builds the distribution packages into target/packages/:
#   tidemark-common_VERSION-1_ARCH.deb    /usr/bin/tidemark, man pages, completions
#   tidemark-agent_VERSION-1_ARCH.deb     tracker + shipper units, their configs
#   tidemark-receiver_VERSION-1_ARCH.deb  receiver unit, its config
#   tidemark-VERSION-1.ARCH.rpm           all of it in one package
# The man pages and completions are written by the binary itself
# (`tidemark generate-docs`), from the same clap definitions it parses with.
#
# Installs cargo-deb and cargo-generate-rpm if they are missing.
# TIDEMARK_PACKAGE_PROFILE=dev packages an unoptimised build (tests only).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${TIDEMARK_PACKAGE_PROFILE:-release}
case $profile in
    release) profile_dir=release ;;
    dev) profile_dir=debug ;;
    *) profile_dir=$profile ;;
esac
target_dir=${CARGO_TARGET_DIR:-target}
out=target/packages

for tool in cargo-deb:3.8.0 cargo-generate-rpm:0.21.1; do
    name=${tool%%:*}
    if ! command -v "$name" >/dev/null 2>&1; then
        echo "==> installing $name (once)"
        cargo install --locked --quiet "$name" --version "${tool#*:}"
    fi
done

echo "==> building tidemark ($profile)"
cargo build --quiet --profile "$profile" -p tidemark --bin tidemark
bin=$target_dir/$profile_dir/tidemark

echo "==> man pages and completions"
rm -rf "$out"
mkdir -p "$out/bin"
"$bin" generate-docs --out "$out/docs"

echo "==> .deb packages"
cargo deb --quiet -p tidemark --no-build --profile "$profile" --output "$out/"
for variant in agent receiver; do
    cargo deb --quiet -p tidemark --no-build --profile "$profile" --variant "$variant" --output "$out/"
done

echo "==> .rpm package"
# cargo-generate-rpm packages what it is given: give it a stripped copy.
objcopy --strip-debug "$bin" "$out/bin/tidemark"
cargo generate-rpm -p cli --output "$out/"

ls -l "$out"/*.deb "$out"/*.rpm
