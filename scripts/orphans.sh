#!/usr/bin/env bash
# List, stop and count the processes a test run left behind.
#
#   HANGAR_TEST_TMP=ROOT scripts/orphans.sh
#
# (ROOT goes in the environment, not on the command line, so this script's own shells never
# match.) ROOT is the folder the run's TMPDIR pointed at (scripts/test.sh makes one per run), so
# every temp folder of every test lives under it. A process is a leftover when it still
# runs after the tests have ended and points into ROOT: its command line names a path
# under ROOT, its working folder is under ROOT, or its environment has TMPDIR=ROOT (what
# everything the tests started inherits). Once the tests have ended, each such process has
# lost the test that started it (its ppid is 1 or a subreaper, or another leftover). Each is
# printed (pid, ppid, age in seconds, command line) and killed, and the script exits 1 when
# any was found, 0 otherwise. Linux only (/proc); elsewhere it says so and exits 0.
set -uo pipefail

root="${HANGAR_TEST_TMP:?usage: HANGAR_TEST_TMP=ROOT $0}"
root="${root%/}"
[ -d /proc/self ] || { echo "orphans.sh: no /proc; not checked" >&2; exit 0; }
if [ -z "$root" ] || [ "$root" = "/" ]; then
    echo "orphans.sh: refusing root folder ${root:-(empty)}" >&2
    exit 2
fi

self=$$
found=()
for d in /proc/[0-9]*; do
    pid="${d#/proc/}"
    [ "$pid" = "$self" ] && continue
    [ "$pid" = "$BASHPID" ] && continue
    # Zombies and kernel threads have no command line.
    cmd=$(tr '\0' ' ' 2>/dev/null <"$d/cmdline") || continue
    [ -n "$cmd" ] || continue
    hit=""
    case "$cmd" in *"$root/"* | *"$root "*) hit=cmdline ;; esac
    if [ -z "$hit" ]; then
        cwd=$(readlink "$d/cwd" 2>/dev/null || true)
        case "$cwd" in "$root" | "$root"/*) hit=cwd ;; esac
    fi
    if [ -z "$hit" ] && tr '\0' '\n' 2>/dev/null <"$d/environ" | grep -qxF "TMPDIR=$root"; then
        hit=environ
    fi
    [ -n "$hit" ] && found+=("$pid")
done

[ ${#found[@]} -eq 0 ] && exit 0

echo "orphans.sh: ${#found[@]} process(es) outlived the tests (pointing into $root):" >&2
for pid in "${found[@]}"; do
    ps -o pid=,ppid=,etimes=,args= -p "$pid" >&2 2>/dev/null || true
done
for pid in "${found[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
done
exit 1
