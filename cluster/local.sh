#!/usr/bin/env bash
# cluster/local.sh: a real multi-node Ray cluster on one machine, for tests and laptop runs.
# A head and N worker nodes, each its own raylet started with `ray start --block`, with its own
# CPUs, custom resources (head: soulray_head; worker i: soulray_worker and soulray_worker_<i>),
# its own free ports and one Ray temp dir per cluster. The dashboard (job API) listens on
# 127.0.0.1 only; every other Ray port requires the cluster's token.
#
#   cluster/local.sh up [N]    start a head + N workers (default 1) and print the addresses
#   cluster/local.sh status    print the addresses and the alive nodes of the running cluster
#   cluster/local.sh down      stop exactly the processes `up` started; fails if one survives
#
#   source cluster/.local/env  then: ray job submit -- python -c 'print(1)'
#
# Token auth: `up` writes a fresh random token to $STATE/auth_token (mode 600) and starts every
# node with RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<that file> (RAY_AUTH_TOKEN unset, since it
# would take precedence). Clients use the same two variables: $STATE/env exports them together
# with RAY_API_SERVER_ADDRESS (the dashboard URL, read by `ray job` and JobSubmissionClient) and
# RAY_GCS_ADDRESS (for ray.init(address=...)). ~/.ray/auth_token is neither read nor written.
#
# `down` never runs `ray stop` (that would kill every Ray on the machine, other users' included):
# it signals the process groups it started, then kills any process that still carries this
# cluster's SOULRAY_LOCAL_CLUSTER=<id> environment marker (Ray workers and job drivers inherit it).
#
# Knobs (environment): SOULRAY_LOCAL_DIR (state dir, default cluster/.local),
# SOULRAY_LOCAL_HEAD_CPUS (1), SOULRAY_LOCAL_WORKER_CPUS (2), SOULRAY_LOCAL_OBJECT_STORE_MB (256),
# PYTHON (default .venv/bin/python, else python3; ray is taken from beside it).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${SOULRAY_LOCAL_DIR:-$ROOT/cluster/.local}
HEAD_CPUS=${SOULRAY_LOCAL_HEAD_CPUS:-1}
WORKER_CPUS=${SOULRAY_LOCAL_WORKER_CPUS:-2}
OBJECT_STORE_BYTES=$(( ${SOULRAY_LOCAL_OBJECT_STORE_MB:-256} * 1024 * 1024 ))
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
RAY=$(dirname "$(command -v "$PYTHON")")/ray
WORKER_PORTS_PER_NODE=200

die() { echo "local.sh: $*" >&2; exit 1; }

# Free TCP ports: `free_ports SINGLES NODES RUN` prints SINGLES distinct free ports on one line,
# then on a second line, for each of NODES nodes, the start of a free run of RUN consecutive ports
# (its worker ports), kept clear of Ray's default worker range (10002-19999) and of the kernel's
# ephemeral range (32768+).
free_ports() {
  "$PYTHON" - "$@" <<'EOF'
import random, socket, sys
singles, nodes, run = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
held = []
for _ in range(singles):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); held.append(s)
print(" ".join(str(s.getsockname()[1]) for s in held))
def free_run(start):
    for port in range(start, start + run):
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
starts, bases = [], list(range(20000, 32000 - run, run))
random.shuffle(bases)
for base in bases:
    if len(starts) == nodes:
        break
    if free_run(base):
        starts.append(base)
if len(starts) < nodes:
    sys.exit("no free worker port ranges in 20000-32000")
print(" ".join(map(str, starts)))
for s in held:
    s.close()
EOF
}

# Live processes of this cluster: members of the started process groups, or carrying the
# marker. Zombies (exited, waiting for their parent to reap them) run nothing and are left out.
cluster_pids() {
  "$PYTHON" - "$@" <<'EOF'
import os, sys
marker, groups = f"SOULRAY_LOCAL_CLUSTER={sys.argv[1]}".encode(), set(sys.argv[2:])
mine = {str(os.getpid()), str(os.getppid())}
for pid in filter(str.isdigit, os.listdir("/proc")):
    if pid in mine:
        continue
    try:
        with open(f"/proc/{pid}/stat") as f:
            state, _ppid, pgid = f.read().rpartition(")")[2].split()[:3]
        if state == "Z":
            continue
        if pgid in groups:
            print(pid)
            continue
        with open(f"/proc/{pid}/environ", "rb") as f:
            if marker in f.read().split(b"\0"):
                print(pid)
    except OSError:
        pass  # exited meanwhile, or not ours to read
EOF
}

# Start one node in its own session (pid == pgid) with the cluster's env; prints its pid.
# Each node has its own temp dir: nodes sharing one would share runtime_resources/, and one
# node's runtime-env agent would re-extract a job's working_dir under another node's driver.
start_node() {
  local log=$1 temp_dir=$2; shift 2
  (
    cd "$ROOT"  # job drivers and workers run here, so relative paths like jobs/x.yaml resolve
    unset RAY_AUTH_TOKEN RAY_ADDRESS
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE/auth_token
    export SOULRAY_LOCAL_CLUSTER=$CLUSTER_ID RAY_USAGE_STATS_ENABLED=0
    # As if the venv were activated: a job's `python` / `soulray` are the ones beside $RAY.
    PATH=$(dirname "$RAY"):$PATH
    export PATH
    exec setsid "$RAY" start --block --disable-usage-stats \
      --temp-dir="$temp_dir" --object-store-memory="$OBJECT_STORE_BYTES" "$@" >"$log" 2>&1 </dev/null
  ) &
  echo $!
}

wait_http() {
  local url=$1 pid=$2 log=$3
  for _ in $(seq 1 120); do
    kill -0 "$pid" 2>/dev/null || { tail -n 30 "$log" >&2; die "node exited while starting (log: $log)"; }
    curl -s -o /dev/null "$url" && return 0
    sleep 0.5
  done
  die "timed out waiting for $url (log: $log)"
}

# Alive nodes through the dashboard's state API, authenticated with the cluster token.
alive_nodes() {
  curl -sf -H "Authorization: Bearer $(cat "$STATE/auth_token")" \
    "$DASHBOARD_URL/api/v0/nodes?limit=1000&detail=false" |
    "$PYTHON" -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]["result"]; print(sum(n["state"]=="ALIVE" for n in r))'
}

cmd_up() {
  local workers=${1:-1}
  [[ $workers =~ ^[0-9]+$ ]] || die "usage: local.sh up [N]  (N = number of worker nodes)"
  if [[ -f $STATE/state ]]; then
    die "a cluster is already recorded in $STATE/state; run 'cluster/local.sh down' first"
  fi
  mkdir -p "$STATE/logs"
  trap 'echo "local.sh: up failed; stopping what it started" >&2; [[ -f $STATE/state ]] && cmd_down >&2' EXIT
  CLUSTER_ID=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(4))')
  TEMP_DIR=/tmp/soulray-ray-$CLUSTER_ID  # short: Ray's unix sockets live under it
  (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$STATE/auth_token")

  local singles=$(( 9 + 6 * workers ))
  local lines; mapfile -t lines < <(free_ports "$singles" $(( workers + 1 )) "$WORKER_PORTS_PER_NODE")
  local -a p runs
  read -ra p <<<"${lines[0]}"
  read -ra runs <<<"${lines[1]}"
  local gcs=${p[0]} dash=${p[1]}
  DASHBOARD_URL=http://127.0.0.1:$dash
  local pids=()
  {
    echo "CLUSTER_ID=$CLUSTER_ID"; echo "TEMP_DIR=$TEMP_DIR"
    echo "GCS_ADDRESS=127.0.0.1:$gcs"; echo "DASHBOARD_URL=$DASHBOARD_URL"; echo "PIDS=''"
  } >"$STATE/state"

  local pid
  pid=$(start_node "$STATE/logs/head.log" "$TEMP_DIR" --head --port="$gcs" --dashboard-port="$dash" \
    --dashboard-host=127.0.0.1 --ray-client-server-port="${p[2]}" --num-cpus="$HEAD_CPUS" \
    --resources='{"soulray_head": 1}' --node-manager-port="${p[3]}" \
    --object-manager-port="${p[4]}" --dashboard-agent-listen-port="${p[5]}" \
    --dashboard-agent-grpc-port="${p[6]}" --runtime-env-agent-port="${p[7]}" \
    --metrics-export-port="${p[8]}" --min-worker-port="${runs[0]}" \
    --max-worker-port=$(( runs[0] + WORKER_PORTS_PER_NODE - 1 )))
  pids+=("$pid"); sed -i "s/^PIDS=.*/PIDS='${pids[*]}'/" "$STATE/state"
  wait_http "$DASHBOARD_URL/api/version" "$pid" "$STATE/logs/head.log"

  for i in $(seq 1 "$workers"); do
    local o=$(( 9 + 6 * (i - 1) )) base=${runs[$i]}
    pid=$(start_node "$STATE/logs/worker$i.log" "$TEMP_DIR-w$i" --address="127.0.0.1:$gcs" \
      --num-cpus="$WORKER_CPUS" --resources="{\"soulray_worker\": 1, \"soulray_worker_$i\": 1}" \
      --node-manager-port="${p[o]}" --object-manager-port="${p[o + 1]}" \
      --dashboard-agent-listen-port="${p[o + 2]}" --dashboard-agent-grpc-port="${p[o + 3]}" \
      --runtime-env-agent-port="${p[o + 4]}" --metrics-export-port="${p[o + 5]}" \
      --min-worker-port="$base" --max-worker-port=$(( base + WORKER_PORTS_PER_NODE - 1 )))
    pids+=("$pid"); sed -i "s/^PIDS=.*/PIDS='${pids[*]}'/" "$STATE/state"
  done

  local want=$(( workers + 1 )) have=0
  for _ in $(seq 1 120); do
    have=$(alive_nodes 2>/dev/null || echo 0)
    [[ $have == "$want" ]] && break
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null || die "a node exited while starting (logs: $STATE/logs)"
    done
    sleep 0.5
  done
  [[ $have == "$want" ]] || die "only $have of $want nodes came up (logs: $STATE/logs)"

  cat >"$STATE/env" <<EOF
# source this file to use the local cluster (written by cluster/local.sh up)
unset RAY_AUTH_TOKEN
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$STATE/auth_token
export RAY_API_SERVER_ADDRESS=$DASHBOARD_URL
export RAY_GCS_ADDRESS=127.0.0.1:$gcs
EOF
  trap - EXIT
  print_info "$want"
}

print_info() {
  cat <<EOF
local Ray cluster $CLUSTER_ID: $1 nodes alive (head + $(( $1 - 1 )) workers)
  GCS address:  $(grep ^GCS_ADDRESS= "$STATE/state" | cut -d= -f2)   (ray.init(address=...))
  dashboard:    $DASHBOARD_URL   (ray job submit --address ...)
  auth token:   $STATE/auth_token
  logs:         $STATE/logs, $TEMP_DIR/session_latest/logs
  use it:       source $STATE/env && ray job submit -- python -c 'print(1)'
  stop it:      cluster/local.sh down
EOF
}

load_state() {
  [[ -f $STATE/state ]] || die "no cluster recorded in $STATE/state"
  # shellcheck disable=SC1091
  source "$STATE/state"
}

cmd_status() {
  load_state
  print_info "$(alive_nodes || echo 0)"
}

cmd_down() {
  load_state
  local -a groups left
  # shellcheck disable=SC2153  # PIDS, CLUSTER_ID and TEMP_DIR come from the state file
  read -ra groups <<<"$PIDS"
  # Workers first, then the head: each `ray start --block` stops its own Ray processes on SIGTERM.
  local i
  for (( i = ${#groups[@]} - 1; i >= 0; i-- )); do kill -TERM "${groups[i]}" 2>/dev/null || true; done
  for _ in $(seq 1 40); do
    mapfile -t left < <(cluster_pids "$CLUSTER_ID" "${groups[@]}")
    (( ${#left[@]} == 0 )) && break
    sleep 0.5
  done
  if (( ${#left[@]} )); then
    kill -TERM "${left[@]}" 2>/dev/null || true
    sleep 3
    mapfile -t left < <(cluster_pids "$CLUSTER_ID" "${groups[@]}")
    if (( ${#left[@]} )); then kill -KILL "${left[@]}" 2>/dev/null || true; sleep 1; fi
    mapfile -t left < <(cluster_pids "$CLUSTER_ID" "${groups[@]}")
  fi
  if (( ${#left[@]} )); then
    ps -o pid,pgid,cmd -p "${left[*]}" >&2 || true
    die "processes of cluster $CLUSTER_ID survived SIGKILL"
  fi
  rm -rf "$TEMP_DIR" "$TEMP_DIR"-w* "$STATE/state" "$STATE/env" "$STATE/auth_token"
  echo "local Ray cluster $CLUSTER_ID stopped; no process left (logs kept in $STATE/logs)"
}

case ${1:-} in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) die "usage: cluster/local.sh up [N] | status | down" ;;
esac
