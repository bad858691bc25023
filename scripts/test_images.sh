#!/usr/bin/env bash
# Runs the CPU image (scripts/build_images.sh): a target and a draft, each in its own working
# container of ssd-serve:cpu started with `buildah run --isolation chroot` (no daemon; `podman run`
# fails on these machines: crun cannot set RLIMIT_NPROC), as the image's user, on loopback, the draft
# registered with the target. Then a greedy SSD completion through them must equal, token for token,
# `ssd generate --mode ar` (the target alone, in-process) on the host. Exit 0 iff it does.
#
#   bash scripts/test_images.sh
#   PYTHON=.venv/bin/python PROMPT="def add(a, b):" MAX_NEW_TOKENS=48 bash scripts/test_images.sh
#
# Needs buildah and, on the host, ssd-serve (PYTHON: its interpreter; default .venv/bin/python, else
# python3). Logs: runs/images/test/{target,draft}.log.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

IMAGE=${CPU_IMAGE:-ssd-serve:cpu}
LOG_DIR=${LOG_DIR:-runs/images/test}
PROMPT=${PROMPT:-def fibonacci(n):}
N=${MAX_NEW_TOKENS:-32}
STARTUP_S=${STARTUP_S:-240}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$LOG_DIR"
command -v buildah >/dev/null || { echo "test_images.sh: needs buildah (apt-get install buildah)" >&2; exit 1; }
buildah inspect --type image "$IMAGE" >/dev/null 2>&1 \
  || { echo "test_images.sh: no image $IMAGE (bash scripts/build_images.sh cpu)" >&2; exit 1; }

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
T_PORT=$(free_port); D_PORT=$(free_port)
TOKEN=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(16))')
ssd() { OMP_NUM_THREADS=1 "$PYTHON" -m ssd_cli.main "$@"; }

ctrs=() pids=()
service_pids() {  # the command under `buildah run` pid $1: its descendant inside the chroot that is not buildah's
  local todo=("$1") pid kid exe
  while [ ${#todo[@]} -gt 0 ]; do
    pid=${todo[0]}; todo=("${todo[@]:1}")
    for kid in $(pgrep -P "$pid" 2>/dev/null || true); do
      todo+=("$kid")
      exe=$(readlink "/proc/$kid/exe" 2>/dev/null || true)
      [ "$(readlink "/proc/$kid/root" 2>/dev/null)" != / ] && [[ "$exe" != /memfd:buildah* ]] && echo "$kid"
    done
  done
  return 0
}
cleanup() {  # SIGTERM the services themselves (buildah run does not forward it): they drain and exit
  local i pid svc
  for (( i = ${#pids[@]} - 1; i >= 0; i-- )); do  # the draft first: it deregisters from the live target
    pid=${pids[$i]}
    for svc in $(service_pids "$pid"); do kill -TERM "$svc" 2>/dev/null || true; done
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    for svc in $(service_pids "$pid"); do kill -KILL "$svc" 2>/dev/null || true; done
    wait "$pid" 2>/dev/null || true
  done
  for ctr in "${ctrs[@]}"; do buildah rm "$ctr" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT

start() {  # start NAME ARGS...: `ssd ARGS` in a fresh working container of the image, in the background
  local name=$1 ctr; shift
  ctr=$(buildah from --pull-never --name "ssd-test-$name-$$" "$IMAGE")
  ctrs+=("$ctr")
  buildah run --isolation chroot --user 10001:10001 --env HOME=/tmp --env SSD_AUTH_TOKEN="$TOKEN" \
    --env OMP_NUM_THREADS=1 "$ctr" -- ssd --log-level INFO "$@" >"$LOG_DIR/$name.log" 2>&1 &
  pids+=("$!")
}

t0=$(date +%s)
# --planner table: run speculative rounds whatever the start-up calibration says, so the draft is used
start target serve target --model /app/ssd_models/default/target --host 127.0.0.1 --port "$T_PORT" \
  --threads 1 --planner table --trusted-draft shared@127.0.0.1
start draft serve draft --model /app/ssd_models/default/draft --host 127.0.0.1 --port "$D_PORT" \
  --threads 1 --targets "127.0.0.1:$T_PORT"

# ready: the target's ModelInfo names a registered draft (gRPC GetModelInfo, not a log line)
while :; do
  info=$(ssd client info --addr "127.0.0.1:$T_PORT" --timeout 2 --max-retries 0 2>/dev/null || true)
  if [ -n "$info" ] && "$PYTHON" -c 'import json, sys; sys.exit(not json.loads(sys.argv[1]).get("draft_model_id"))' "$info"; then
    break
  fi
  for i in "${!pids[@]}"; do
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      name=$([ "$i" = 0 ] && echo target || echo draft)
      echo "test_images.sh: the $name container exited; its log:" >&2; tail -30 "$LOG_DIR/$name.log" >&2; exit 1
    fi
  done
  if [ $(( $(date +%s) - t0 )) -gt "$STARTUP_S" ]; then
    echo "test_images.sh: not ready after ${STARTUP_S}s (logs in $LOG_DIR)" >&2; exit 1
  fi
  sleep 1
done
ready_s=$(( $(date +%s) - t0 ))
echo "== target and draft from $IMAGE ready in ${ready_s}s: $info"

served=$(ssd client generate --addr "127.0.0.1:$T_PORT" --prompt "$PROMPT" --max-new-tokens "$N" --ignore-eos \
  --mode ssd --timeout 120 --json)
echo "== served (image, ssd): $served"
reference=$(ssd generate --mode ar --prompt "$PROMPT" --max-new-tokens "$N" --ignore-eos --threads 1 --json 2>/dev/null)
echo "== host (ssd generate --mode ar): $reference"
status=0
"$PYTHON" - "$served" "$reference" "$N" <<'PY' || status=$?
import json, sys

served, reference, n = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
assert len(reference["token_ids"]) == n, reference
if served["token_ids"] != reference["token_ids"]:
    sys.exit(f"FAIL: the image's served tokens differ from the host's target alone:\n{served['token_ids']}\n{reference['token_ids']}")
stats = served.get("stats", {})
print(f"PASS: {n} tokens identical; served mean accepted length {stats.get('mean_accepted_length')}, "
      f"cache hit rate {stats.get('cache_hit_rate')}")
PY
cleanup
trap - EXIT
for name in target draft; do  # both stopped on SIGTERM, not killed
  grep -qE "target stopped|shutting down" "$LOG_DIR/$name.log" || { echo "test_images.sh: the $name did not stop cleanly (see $LOG_DIR/$name.log)" >&2; status=1; }
done
echo "== total ${SECONDS}s"
exit "$status"
