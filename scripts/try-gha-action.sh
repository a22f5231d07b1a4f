#!/usr/bin/env bash
# Run the Parallels DevOps GitHub Action's own bundle (its committed dist/index.js) against
# Hangar, with node and the INPUT_* variables a runner sets, in host mode and orchestrator
# mode: health-check, pull (from a catalog on the host), clone, stop, start, run, delete.
#
#   scripts/try-gha-action.sh ACTION_DIR
#
# ACTION_DIR is a checkout of Parallels/parallels-desktop-github-action (only dist/index.js is
# used; the action's code is not part of Hangar). The hosts drive the fake prlctl (Parallels
# Desktop is macOS-only). Needs node (20 or later) and a built `hangar` and
# `hangar-fake-prlctl` (cargo build -p hangar -p hangar-parallels). Prints one line per step
# and exits non-zero at the first step the action fails.
set -euo pipefail

action_dir=${1:?usage: scripts/try-gha-action.sh ACTION_DIR (a checkout of the GitHub Action)}
index="$action_dir/dist/index.js"
[ -f "$index" ] || { echo "no $index: give the folder of the action's checkout" >&2; exit 2; }
command -v node >/dev/null || { echo "node is missing: apt-get install nodejs" >&2; exit 2; }
target=${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/.." && pwd)/target}
hangar="$target/debug/hangar"
fake="$target/debug/hangar-fake-prlctl"
for b in "$hangar" "$fake"; do
  [ -x "$b" ] || { echo "$b is missing: cargo build -p hangar -p hangar-parallels" >&2; exit 2; }
done

work=$(mktemp -d /tmp/hangar-gha.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -n "${GHA_KEEP:-}" ] && { echo "kept $work"; return; }
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

password='Root-Passw0rd-gha'
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# A fake Parallels host with a golden bundle.
mkdir -p "$work/tools" "$work/prl" "$work/images"
ln -s "$fake" "$work/tools/prlctl"
ln -s "$fake" "$work/tools/prlsrvctl"
export FAKE_PRL_STATE_DIR="$work/prl"
"$work/tools/prlctl" create golden --distribution ubuntu >/dev/null
"$work/tools/prlctl" unregister golden >/dev/null
mv "$work/prl/Parallels/golden.pvm" "$work/images/golden.pvm"

serve() { # name port modules [extra --set ...]
  local name=$1 port=$2 modules=$3
  shift 3
  ROOT_PASSWORD=$password LOG_LEVEL=warn "$hangar" serve --data-dir "$work/$name" --port "$port" \
    --set API_HOST=127.0.0.1 --set ENABLED_MODULES="$modules" "$@" >"$work/$name.out" 2>"$work/$name.err" &
  pids+=($!)
  for _ in $(seq 1 300); do
    curl -fs "http://127.0.0.1:$port/api/health/probe" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "$name did not start: $(cat "$work/$name.err")" >&2
  exit 1
}

host_port=$(free_port)
serve host "$host_port" api,host,catalog --set HYPERVISOR=parallels --set PRLCTL_PATH="$work/tools/prlctl" \
  --set HOST_IMAGES_FOLDER="$work/images" --set SYSTEM_RESERVED_CPU=0
# The orchestrator runs a host module of its own too (a Mac orchestrator, as the action's
# orchestrator-mode clone goes to the host routes of the orchestrator's URL), on its own fake
# state with a stopped base VM.
orch_port=$(free_port)
mkdir -p "$work/prl-orch"
FAKE_PRL_STATE_DIR="$work/prl-orch" "$work/tools/prlctl" create ci-base --distribution ubuntu >/dev/null
FAKE_PRL_STATE_DIR="$work/prl-orch" serve orch "$orch_port" api,orchestrator,host --set HYPERVISOR=parallels \
  --set PRLCTL_PATH="$work/tools/prlctl" --set HOST_IMAGES_FOLDER="$work/images"

# The image in the host's catalog, and the host registered on the orchestrator.
HANGAR_CONFIG_DIR="$work/cli" XDG_CACHE_HOME="$work/cli-cache" "$hangar" --url "http://127.0.0.1:$host_port" \
  login --username root --password-stdin <<<"$password" >/dev/null
HANGAR_CONFIG_DIR="$work/cli" XDG_CACHE_HOME="$work/cli-cache" "$hangar" --url "http://127.0.0.1:$host_port" \
  catalog push --provider "provider=local-storage;catalog_path=$work/store" --catalog-id ci-image \
  --version 1.0.0 --architecture amd64 --path "$work/images/golden.pvm" >/dev/null
token=$(curl -fs -X POST "http://127.0.0.1:$orch_port/api/v1/auth/token" -H 'Content-Type: application/json' \
  -d "{\"email\":\"root\",\"password\":\"$password\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
curl -fs -X POST "http://127.0.0.1:$orch_port/api/v1/orchestrator/hosts" -H "Authorization: Bearer $token" \
  -H 'Content-Type: application/json' \
  -d "{\"name\":\"mac-1\",\"host\":\"http://127.0.0.1:$host_port\",\"authentication\":{\"username\":\"root\",\"password\":\"$password\"}}" >/dev/null

# One run of the action: mode (host|orchestrator), operation, then NAME=value inputs.
outputs="$work/outputs"
runner='const m = require(process.argv[1]);
const quiet = {track: async () => {}, setUserId() {}, setLicense() {}, flush() {}, init() {}};
m.run(quiet).catch(e => { console.error(e); process.exit(1); });'
act() {
  local mode=$1 op=$2
  shift 2
  local url_var=INPUT_HOST_URL port=$host_port
  if [ "$mode" = orchestrator ]; then url_var=INPUT_ORCHESTRATOR_URL; port=$orch_port; fi
  : >"$outputs"
  local -a envs=(
    "INPUT_OPERATION=$op" "$url_var=127.0.0.1:$port" INPUT_INSECURE=true INPUT_USERNAME=root
    "INPUT_PASSWORD=$password" INPUT_MAX_ATTEMPTS=20 INPUT_TIMEOUT_SECONDS=1 "GITHUB_OUTPUT=$outputs"
  )
  for kv in "$@"; do envs+=("INPUT_$kv"); done
  # The bundle at this snapshot only exports `run(telemetry)` (its build entry is main.ts,
  # not index.ts), so `node dist/index.js` alone does nothing: call `run` as index.ts does,
  # with a telemetry object that sends nothing.
  if env "${envs[@]}" node -e "$runner" "$index" >"$work/step.log" 2>&1; then
    echo "ok   $mode $op $(grep -h -A1 "^vm_name<<" "$outputs" | tail -1)"; [ -n "${GHA_VERBOSE:-}" ] && cat "$work/step.log" || true
  else
    echo "FAIL $mode $op"
    cat "$work/step.log"
    exit 1
  fi
}
output() { awk -v k="$1" '$0 ~ "^"k"<<" {getline; print; exit}' "$outputs"; }

for mode in host orchestrator; do
  port=$host_port
  [ "$mode" = orchestrator ] && port=$orch_port
  act "$mode" health-check
  # In orchestrator mode the catalog is the registered host's.
  act "$mode" pull "BASE_IMAGE=http://root:$password@127.0.0.1:$host_port/amd64/ci-image/1.0.0" START_AFTER_OP=true \
    MACHINE_CPU_COUNT=1 MACHINE_MEMORY_SIZE=1024
  pulled=$(output vm_name)
  [ -n "$pulled" ] || { echo "pull gave no vm_name"; exit 1; }
  act "$mode" stop "MACHINE_NAME=$pulled"
  if [ "$mode" = host ]; then
    # The action clones through the host URL (also in orchestrator mode, where the
    # orchestrator's own host module answers), from a stopped base VM.
    act "$mode" clone "BASE_VM=$pulled" START_AFTER_OP=false
    clone=$(output vm_name)
    act "$mode" delete "MACHINE_NAME=$clone"
  fi
  if [ "$mode" = orchestrator ]; then
    # START_AFTER_OP=false: the action would start the clone through /orchestrator/machines,
    # where a VM of the orchestrator's own host module is not (the reference needs
    # USE_ORCHESTRATOR_RESOURCES for that; Hangar registers such a host like any other).
    act "$mode" clone BASE_VM=ci-base START_AFTER_OP=false
    clone=$(output vm_id)
    curl -s -o /dev/null -X PUT "http://127.0.0.1:$orch_port/api/v1/machines/$clone/stop" -H "Authorization: Bearer $token"
    curl -fs -o /dev/null -X DELETE "http://127.0.0.1:$orch_port/api/v1/machines/$clone" -H "Authorization: Bearer $token"
  fi
  act "$mode" start "MACHINE_NAME=$pulled"
  act "$mode" run "MACHINE_NAME=$pulled" "RUN=echo built
uname -a"
  act "$mode" delete "MACHINE_NAME=$pulled"
done
echo "all steps passed"
