#!/bin/sh
# Installs Hangar from this bundle (written by `hangar bundle`), without any network:
#   1. checks every file against SHA256SUMS (stops at the first mismatch),
#   2. installs bin/hangar as PREFIX/bin/hangar,
#   3. loads image/hangar-image.tar into Docker when the bundle has it and an engine answers,
#   4. copies the Helm chart and the Compose file to PREFIX/share/hangar.
# Usage: ./install.sh [--prefix DIR] [--no-image]     (PREFIX defaults to /usr/local)
set -eu

prefix=/usr/local
load_image=1
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || { echo "install.sh: --prefix needs a folder" >&2; exit 2; }; prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#--prefix=}; shift ;;
        --no-image) load_image=0; shift ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
say() { echo "install.sh: $*"; }

if command -v sha256sum >/dev/null 2>&1; then
    check="sha256sum -c SHA256SUMS"
elif command -v shasum >/dev/null 2>&1; then
    check="shasum -a 256 -c SHA256SUMS"
else
    echo "install.sh: neither sha256sum nor shasum is installed; cannot check the bundle" >&2
    exit 1
fi
if ! report=$($check 2>&1); then
    echo "$report" | grep -v ': OK$' >&2
    echo "install.sh: checksum mismatch: the bundle is damaged; nothing was installed" >&2
    exit 1
fi
say "checksums verified ($(wc -l < SHA256SUMS) files)"

mkdir -p "$prefix/bin" "$prefix/share/hangar"
cp bin/hangar "$prefix/bin/hangar.new"
chmod 0755 "$prefix/bin/hangar.new"
mv -f "$prefix/bin/hangar.new" "$prefix/bin/hangar"
say "installed $prefix/bin/hangar ($("$prefix/bin/hangar" --version))"

for d in helm compose; do
    if [ -d "$d" ]; then
        rm -rf "$prefix/share/hangar/$d"
        cp -R "$d" "$prefix/share/hangar/$d"
        say "copied $d to $prefix/share/hangar/$d"
    fi
done

if [ -f image/hangar-image.tar ]; then
    if [ "$load_image" = 0 ]; then
        say "image not loaded (--no-image); load it later with: docker load -i $here/image/hangar-image.tar"
    elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        docker load -i image/hangar-image.tar
    else
        say "no Docker engine answers here; load the image later with: docker load -i $here/image/hangar-image.tar"
    fi
fi
say "done"
