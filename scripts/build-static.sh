#!/usr/bin/env bash
# Builds `hangar` as a static executable (no shared library, no loader) for a `FROM scratch`
# image and the air-gapped bundle, prints its path on stdout, and checks that `file` and
# `ldd` both call it static.
#
#   scripts/build-static.sh [--profile debug|release]
#
# How: glibc's static libraries (`-C target-feature=+crt-static`, a static-pie) on
# x86_64-unknown-linux-gnu. The flag is given to the final link of the `hangar` binary
# only (`cargo rustc ... -- -C target-feature=+crt-static`): the dependencies (aws-lc-sys
# and zstd-sys included, both C) are the same objects a normal build makes, so after
# `cargo build`/`cargo test` this costs one compile of the `hangar` crate, not a second
# build of the workspace. The result is copied to $CARGO_TARGET_DIR/static/PROFILE/hangar
# (cargo rewrites target/PROFILE/hangar at the next ordinary build).
#
# Caveat of static glibc: name lookups that need an NSS module loaded at run time (LDAP,
# mDNS, systemd-resolved's `resolve`) are not available; `files` (/etc/hosts, /etc/passwd)
# and `dns` (/etc/resolv.conf) are built into glibc 2.34+ and work, which is what a
# container has. The musl target (x86_64-unknown-linux-musl with musl-gcc from Debian's
# musl-tools) is the alternative; it is a separate build of every dependency. arm64: see
# the README ("Deploy with Docker", building for arm64).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=debug
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) [ $# -ge 2 ] || { echo "build-static.sh: --profile needs debug or release" >&2; exit 2; }; profile=$2; shift 2 ;;
        --profile=*) profile=${1#--profile=}; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "build-static.sh: unknown argument $1 (usage: build-static.sh [--profile debug|release])" >&2; exit 2 ;;
    esac
done
case "$profile" in
    debug) cargo_profile=dev ;;
    release) cargo_profile=release ;;
    *) echo "build-static.sh: --profile is debug or release, not $profile" >&2; exit 2 ;;
esac
say() { echo "build-static.sh: $*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else say "need root for: $*"; exit 1; fi
}
need=()
command -v file >/dev/null || need+=(file)
command -v ldd >/dev/null || need+=(libc-bin)
# glibc's static archives (libc.a, libpthread.a, ...) come with libc6-dev.
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || [ "$(uname -m)" != x86_64 ] || need+=(libc6-dev)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

target_dir="${CARGO_TARGET_DIR:-target}"
started=$(date +%s)
# The link of a static glibc binary warns that getaddrinfo/getpwnam "require at runtime the
# shared libraries from the glibc version used for linking" (for NSS modules other than
# files and dns); see the caveat above.
cargo rustc --locked -q -p hangar --bin hangar --profile "$cargo_profile" -- -C target-feature=+crt-static >&2
built="$target_dir/$profile/hangar"
out_dir="$target_dir/static/$profile"
mkdir -p "$out_dir"
cp -f "$built" "$out_dir/hangar.tmp"
mv -f "$out_dir/hangar.tmp" "$out_dir/hangar"
bin="$(cd "$out_dir" && pwd)/hangar"

what=$(file -b "$bin")
case "$what" in
    *"statically linked"*|*"static-pie linked"*) ;;
    *) say "$bin is not static: file says: $what"; exit 1 ;;
esac
lddout=$(ldd "$bin" 2>&1 || true)
case "$lddout" in
    *"statically linked"*|*"not a dynamic executable"*) ;;
    *) say "$bin is not static: ldd says: $lddout"; exit 1 ;;
esac
"$bin" --version >/dev/null
say "static $profile binary in $(( $(date +%s) - started )) s: $(du -h "$bin" | cut -f1), $what"
echo "$bin"
