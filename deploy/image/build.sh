#!/usr/bin/env bash
# Build the Bento's OCI image without a Docker engine or registry, then smoke-test it.
#
#   deploy/image/build.sh [--bento TAG] [--port N] [--skip-smoke] [options]
#
#   --bento TAG          Bento to containerize (default bank_churn:latest; looked up in
#                        $BENTOML_HOME, default ~/bentoml)
#   --port N             host port for the smoke test (default 3000; host network)
#   --skip-smoke         only build the image
#   --skip-build         smoke-test the already built image <image>:<bento version>
#   --image NAME         image name (default localhost/<bento name>; tagged :<version> and :latest)
#   --base-image NAME    local base image (default: make-base.sh's, tagged by its recipe:
#                        localhost/bank-churn-base:bookworm-<recipe>; built or loaded from its cache)
#   --read-only          smoke-test like Kubernetes readOnlyRootFilesystem: root fs mounted
#                        read-only, a tmpfs at /tmp (combine with --env BENTOML_HOME=/tmp/bentoml)
#   --env KEY=VALUE      extra environment variable for the smoke-test container (repeatable)
#   --ready-timeout S    seconds to wait for /readyz (default 300)
#   --ca-bundle FILE     CA bundle bind-mounted (read-only, build time only) over the build
#                        container's /etc/ssl/certs/ca-certificates.crt so pip/uv can reach
#                        PyPI through a TLS-intercepting proxy; "none" to disable
#                        (default: /etc/ssl/certs/ca-certificates.crt when it exists)
#   --keep               keep the smoke-test working container and the logs (for debugging)
#   --layers             commit one layer per Dockerfile step, as Docker does (buildah's default
#                        is one layer for the whole build), for a per-step size report; on vfs
#                        each layer is a full copy of the root fs (~6 GB for the lean image)
#   --hold               after the smoke test, keep serving until standard input closes (or a
#                        line is read), then stop and report: lets a caller test the running
#                        image (tests/test_container.py). Prints "SERVING <url>" when ready.
#
# Steps: (a) deploy/image/make-base.sh (debootstrap base image, cached);
#        (b) `bentoml containerize --backend buildah` with buildah's `--from` replacing the
#            Dockerfile's `FROM python:3.11-slim` by the local base image;
#        (c) `buildah run --isolation chroot` of the image's own ENTRYPOINT/CMD as its USER;
#        (d) GET /readyz, POST /predict, SIGTERM, report size / layers / packages /
#            timings / written paths.
# Storage driver vfs, isolation chroot. Needs root, buildah, debootstrap, curl.
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

BENTO="bank_churn:latest"
PORT=3000
SMOKE=1
BUILD=1
IMAGE=""
BASE_IMAGE="${BASE_IMAGE:-}"
READ_ONLY=0
READY_TIMEOUT=300
STOP_TIMEOUT=30
CA_BUNDLE="/etc/ssl/certs/ca-certificates.crt"
KEEP=0
HOLD=0
LAYERS=0
EXTRA_ENV=()
PAYLOAD='{"customer": {"CreditScore": 619, "Geography": "France", "Gender": "Female", "Age": 42, "Tenure": 2, "Balance": 0.0, "NumOfProducts": 1, "HasCrCard": 1, "IsActiveMember": 1, "EstimatedSalary": 101348.88}}'

die() { echo "build.sh: ERROR: $*" >&2; exit 1; }
log() { echo "build.sh: $*" >&2; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
need_val() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --bento) need_val "$@"; BENTO="$2"; shift 2 ;;
    --bento=*) BENTO="${1#*=}"; shift ;;
    --port) need_val "$@"; PORT="$2"; shift 2 ;;
    --port=*) PORT="${1#*=}"; shift ;;
    --skip-smoke) SMOKE=0; shift ;;
    --skip-build) BUILD=0; shift ;;
    --image) need_val "$@"; IMAGE="$2"; shift 2 ;;
    --image=*) IMAGE="${1#*=}"; shift ;;
    --base-image) need_val "$@"; BASE_IMAGE="$2"; shift 2 ;;
    --base-image=*) BASE_IMAGE="${1#*=}"; shift ;;
    --read-only) READ_ONLY=1; shift ;;
    --env) need_val "$@"; EXTRA_ENV+=("$2"); shift 2 ;;
    --env=*) EXTRA_ENV+=("${1#*=}"); shift ;;
    --ready-timeout) need_val "$@"; READY_TIMEOUT="$2"; shift 2 ;;
    --ready-timeout=*) READY_TIMEOUT="${1#*=}"; shift ;;
    --ca-bundle) need_val "$@"; CA_BUNDLE="$2"; shift 2 ;;
    --ca-bundle=*) CA_BUNDLE="${1#*=}"; shift ;;
    --keep) KEEP=1; shift ;;
    --hold) HOLD=1; shift ;;
    --layers) LAYERS=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

[[ "$PORT" =~ ^[0-9]+$ && "$PORT" -ge 1 && "$PORT" -le 65535 ]] || die "--port must be 1-65535, got '$PORT'"
[[ "$READY_TIMEOUT" =~ ^[0-9]+$ ]] || die "--ready-timeout must be whole seconds, got '$READY_TIMEOUT'"
for kv in "${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}"; do [[ "$kv" == *=* ]] || die "--env expects KEY=VALUE, got '$kv'"; done

# shellcheck source=deploy/image/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
BASE_IMAGE="${BASE_IMAGE:-$("$HERE/make-base.sh" --print-image)}"
command -v curl >/dev/null || die "curl not found: apt-get install curl"
if [[ -n "${BENTOML_BIN:-}" ]]; then :;
elif [[ -x "$REPO/.venv/bin/bentoml" ]]; then BENTOML_BIN="$REPO/.venv/bin/bentoml";
elif command -v bentoml >/dev/null; then BENTOML_BIN="$(command -v bentoml)";
else die "bentoml not found (looked for \$BENTOML_BIN, $REPO/.venv/bin/bentoml, PATH)"; fi
BUILDAH_EXE="$(readlink -f "$(command -v buildah)")"
PY="$(dirname "$BENTOML_BIN")/python"; [[ -x "$PY" ]] || PY="$(command -v python3)" || die "python3 not found"

# ---------------------------------------------------------------- resolve the Bento
bento_json="$("$BENTOML_BIN" get "$BENTO" -o json 2>/dev/null)" \
  || die "Bento '$BENTO' not found in ${BENTOML_HOME:-~/bentoml} (run 'bentoml build' first, or pass --bento / BENTOML_HOME)"
read -r BENTO_NAME BENTO_VERSION < <(printf '%s' "$bento_json" | "$PY" -c \
  'import json,sys; d=json.load(sys.stdin); print(d["name"], d["version"])') \
  || die "could not parse 'bentoml get $BENTO -o json' output"
BENTO_TAG="$BENTO_NAME:$BENTO_VERSION"
IMAGE="${IMAGE:-localhost/$BENTO_NAME}"
IMAGE_REF="$IMAGE:$BENTO_VERSION"
log "Bento $BENTO_TAG -> image $IMAGE_REF (base $BASE_IMAGE, storage $STORAGE_DRIVER, isolation chroot)"

WORK="$(mktemp -d /tmp/bank-churn-image.XXXXXX)"
BUILD_LOG="$WORK/build.log"
RUN_LOG="$WORK/container.log"

# state used by cleanup()
RUN_PID=""; MAIN_PID=""; CTR=""; RO_MNT=""; ROOTFS_BYTES=""; PACKAGES=""; IMAGE_PYTHON=""; CONTENTS=""; LARGEST=""
cleanup() {
  local rc=$?
  set +e
  if [[ -n "$RUN_PID" ]] && kill -0 "$RUN_PID" 2>/dev/null; then
    [[ -n "$MAIN_PID" ]] && kill -TERM "$MAIN_PID" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$RUN_PID" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$RUN_PID" 2>/dev/null; then
      # Only the process tree we started: buildah run and its descendants.
      local pids; pids="$(descendants "$RUN_PID")"
      kill -KILL "$RUN_PID" $pids 2>/dev/null
    fi
    wait "$RUN_PID" 2>/dev/null
  fi
  [[ -n "$RO_MNT" ]] && umount "$RO_MNT" 2>/dev/null
  if [[ -n "$CTR" && $KEEP -eq 0 ]]; then
    buildah umount "$CTR" >/dev/null 2>&1; buildah rm "$CTR" >/dev/null 2>&1
  elif [[ -n "$CTR" ]]; then
    log "kept working container $CTR (buildah --storage-driver $STORAGE_DRIVER rm $CTR)"
  fi
  if [[ $rc -ne 0 || $KEEP -eq 1 ]]; then log "logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

descendants() {  # all descendant PIDs of $1, breadth-first
  local queue=("$1") out=() p c
  while [[ ${#queue[@]} -gt 0 ]]; do
    p="${queue[0]}"; queue=("${queue[@]:1}")
    for c in $(pgrep -P "$p" 2>/dev/null); do out+=("$c"); queue+=("$c"); done
  done
  echo "${out[@]+"${out[@]}"}"
}

now() { date +%s.%N; }
# Container log tail without buildah 1.28's Go panic trace (it panics in its own cleanup
# when a command fails or when the root fs is read-only: a nil-logger bug, not ours).
log_tail() { sed '/^panic: /,$d' "$RUN_LOG" | tail -n "${1:-25}" >&2; }
secs() { "$PY" -c 'import sys; print(f"{float(sys.argv[2]) - float(sys.argv[1]):.1f}")' "$1" "$2"; }

build_image() {
  # ---------------------------------------------------------------- (a) base image
  t_base0="$(now)"
  "$HERE/make-base.sh" --image "$BASE_IMAGE" 2>&1 | tee "$WORK/base.log" >&2 || die "base image step failed (deploy/image/make-base.sh)"
  if grep -q "is in buildah's storage" "$WORK/base.log"; then BASE_STATE="in buildah storage"
  elif grep -q "loaded from the cache" "$WORK/base.log"; then BASE_STATE="loaded from the cache archive"
  else BASE_STATE="built with debootstrap"; fi
  BASE_SECONDS="$(secs "$t_base0" "$(now)")"

  # ---------------------------------------------------------------- (b) Bento image
  # `bentoml containerize` regenerates the Dockerfile (env/docker/Dockerfile) and builds it in
  # a temporary context that also receives the Bento's models from the local model store.
  # buildah's --from replaces the first FROM (python:3.11-slim) with the local base image.
  opts=(--opt "from=$BASE_IMAGE" --opt isolation=chroot --opt "storage-driver=$STORAGE_DRIVER"
        --opt "iidfile=$WORK/iid")
  [[ $LAYERS -eq 1 ]] && opts+=(--opt layers)
  if [[ "$CA_BUNDLE" != "none" && -f "$CA_BUNDLE" ]]; then
    opts+=(--opt "volume=$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
    log "build-time CA bundle: $CA_BUNDLE (bind-mounted read-only during RUN steps; not stored in the image)"
  elif [[ "$CA_BUNDLE" != "none" ]]; then
    die "--ca-bundle $CA_BUNDLE does not exist (pass --ca-bundle none to build without one)"
  fi
  old_id="$(buildah inspect --type image --format '{{.FromImageID}}' "$IMAGE_REF" 2>/dev/null || true)"
  log "building $IMAGE_REF with bentoml containerize --backend buildah (log: $BUILD_LOG)"
  t_build0="$(now)"
  # Run from the directory that holds its temporary build context: with a dockerfile_template,
  # bentoml 1.4.39 refuses a template outside the working directory (BentoML issue #5566).
  if ! (cd "$WORK" && TMPDIR="$WORK" "$BENTOML_BIN" containerize "$BENTO_TAG" --backend buildah -t "$IMAGE_REF" "${opts[@]}") >"$BUILD_LOG" 2>&1 \
     || [[ ! -s "$WORK/iid" ]]; then
    grep -E '^(INFO: )?(Error|error):|ERROR|No matching distribution|Could not|failed' "$BUILD_LOG" | tail -n 8 >&2 || true
    die "image build failed: $(grep -E '^(INFO: )?Error: ' "$BUILD_LOG" | tail -n1 | sed 's/^INFO: //' || echo 'see log') (full log: $BUILD_LOG)"
  fi
  BUILD_SECONDS="$(secs "$t_build0" "$(now)")"
  IMAGE_ID="$(sed 's/^sha256://' "$WORK/iid")"
  buildah tag "$IMAGE_ID" "$IMAGE:latest" >/dev/null || die "buildah tag $IMAGE:latest failed"
  if [[ -n "$old_id" && "$old_id" != "$IMAGE_ID" ]]; then
    buildah rmi "$old_id" >/dev/null 2>&1 || true   # superseded build of the same tag (vfs images are big)
  fi
  SIZE_HUMAN="$(buildah images --format '{{.Size}}' "$IMAGE_ID" | sed -n 1p)"   # uncompressed, as `docker images` shows
  log "built $IMAGE_REF (${IMAGE_ID:0:12}, $SIZE_HUMAN) in ${BUILD_SECONDS}s"
}

if [[ $BUILD -eq 0 ]]; then
  IMAGE_ID="$(buildah inspect --type image --format '{{.FromImageID}}' "$IMAGE_REF" 2>/dev/null)" \
    || die "--skip-build: image $IMAGE_REF does not exist (build it first)"
  SIZE_HUMAN="$(buildah images --format '{{.Size}}' "$IMAGE_ID" | sed -n 1p)"
  BASE_STATE="skipped"; BASE_SECONDS=""; BUILD_SECONDS=""
else
  build_image
fi

report() {
  echo "== bank-churn image report =="
  echo "bento:            $BENTO_TAG"
  echo "image:            $IMAGE_REF (also $IMAGE:latest) id ${IMAGE_ID:0:12}"
  echo "image size:       $SIZE_HUMAN (uncompressed)${ROOTFS_BYTES:+; root fs $ROOTFS_BYTES bytes}"
  echo "layers (uncompressed; python3 deploy/image/layers.py $IMAGE_REF):"
  "$PY" "$HERE/layers.py" "$IMAGE_ID" | sed 's/^/  /' || echo "  (could not read the layer sizes)"
  [[ -n "$CONTENTS" ]] && echo "above the base:   $CONTENTS"
  [[ -n "$LARGEST" ]] && echo "largest packages: $LARGEST"
  [[ -n "$PACKAGES" ]] && echo "python packages:  $PACKAGES"
  [[ -n "$IMAGE_PYTHON" ]] && echo "image python:     $IMAGE_PYTHON"
  if [[ $BUILD -eq 0 ]]; then
    echo "build time:       skipped (--skip-build)"
  else
    echo "base image:       $BASE_IMAGE ($BASE_STATE, ${BASE_SECONDS}s)"
    echo "build time:       ${BUILD_SECONDS}s (bentoml containerize/buildah, excluding base image)"
  fi
}

if [[ $SMOKE -eq 0 ]]; then
  report
  echo "smoke test:       skipped"
  echo "RESULT: OK"
  exit 0
fi

# ---------------------------------------------------------------- (c) run the image
if curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$PORT/" 2>/dev/null || ss -Htln "sport = :$PORT" 2>/dev/null | grep -q .; then
  die "port $PORT is already in use on this host (chroot isolation shares the host network; pass --port)"
fi

# The image's own start command: ENTRYPOINT + CMD, as its USER, with its ENV and WORKDIR.
mapfile -t cfg < <(buildah inspect --type image "$IMAGE_ID" | "$PY" -c '
import json, sys
c = json.load(sys.stdin)["OCIv1"]["config"]
print(c.get("User") or "root")
for a in (c.get("Entrypoint") or []) + (c.get("Cmd") or []):
    print(a)')
USER_NAME="${cfg[0]:-root}"; ENTRY=("${cfg[@]:1}")
[[ ${#ENTRY[@]} -gt 0 ]] || die "image $IMAGE_REF has no ENTRYPOINT/CMD"

CTR="$(buildah from --pull=never --name "bank-churn-smoke-$$" "$IMAGE_ID")" || die "buildah from $IMAGE_ID failed"
MNT="$(buildah mount "$CTR")" || die "buildah mount $CTR failed"
ROOTFS_BYTES="$(du -sb --exclude=./proc --exclude=./sys "$MNT" 2>/dev/null | cut -f1 || true)"
# What the image's venv holds (name==version, as pip would list it) and its Python version.
PACKAGES="$("$PY" - "$MNT" <<'PYEOF'
import email, pathlib, re, sys
found = []
for meta in pathlib.Path(sys.argv[1]).glob("app/.venv/lib/python3*/site-packages/*.dist-info/METADATA"):
    msg = email.message_from_bytes(meta.read_bytes())
    found.append(f"{re.sub(r'[-_.]+', '-', msg['Name']).lower()}=={msg['Version']}")
print(" ".join(sorted(found)))
PYEOF
)" || PACKAGES=""
IMAGE_PYTHON="$(chroot "$MNT" /app/.venv/bin/python -B -c 'import platform; print(platform.python_version())' 2>/dev/null || true)"
# What the layers on top of the base hold, by the Dockerfile step that wrote it (buildah
# commits the whole build as one layer; Docker would make one per step), and the largest packages.
mb() { du -sm "$@" 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
SITE="$(ls -d "$MNT"/app/.venv/lib/python3*/site-packages 2>/dev/null | head -n1)"
CONTENTS="venv /app/.venv $(mb "$MNT/app/.venv") MB; uv $(mb "$MNT/usr/local/bin/uv" "$MNT/usr/local/bin/uvx") MB; bento (code + model) $(mb "$MNT/home/bentoml/bento") MB"
[[ -n "$SITE" ]] && LARGEST="$(cd "$SITE" && du -sm -- * 2>/dev/null | sort -rn | head -n 8 | awk '{printf "%s%s %s MB", (NR > 1 ? ", " : ""), $2, $1}')"
EXPECTED_UID="$(awk -F: -v u="$USER_NAME" '$1==u || $3==u {print $3; exit}' "$MNT/etc/passwd")"
[[ -n "$EXPECTED_UID" ]] || die "image USER '$USER_NAME' not found in the image's /etc/passwd"

run_env=()
[[ "$PORT" != 3000 ]] && run_env+=(-e "BENTOML_PORT=$PORT")
for kv in "${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}"; do run_env+=(-e "$kv"); done
run_opts=(--isolation chroot)
if [[ $READ_ONLY -eq 1 ]]; then
  # buildah needs its bind-mount targets to exist before the root goes read-only.
  mkdir -p "$MNT/run"; touch "$MNT/run/.containerenv" "$MNT/etc/hostname" "$MNT/etc/hosts" "$MNT/etc/resolv.conf"
  mount --bind "$MNT" "$MNT" && RO_MNT="$MNT" && mount -o remount,bind,ro "$MNT" \
    || die "could not make the container root filesystem read-only"
  run_opts+=(--mount "type=tmpfs,destination=/tmp,tmpfs-mode=1777")
  log "read-only root filesystem, tmpfs at /tmp (like readOnlyRootFilesystem + emptyDir /tmp)"
fi

# Snapshot of the root fs to find what the server writes.
SNAP_BEFORE="$WORK/rootfs.before"
(cd "$MNT" && find . -xdev \( -path ./proc -o -path ./sys -o -path ./dev \) -prune -o -printf '%p\t%T@\t%s\n' | sort) >"$SNAP_BEFORE"

log "starting: ${ENTRY[*]} (user $USER_NAME, port $PORT, log: $RUN_LOG)"
t_start="$(now)"
buildah run "${run_opts[@]}" "${run_env[@]+"${run_env[@]}"}" "$CTR" -- "${ENTRY[@]}" >"$RUN_LOG" 2>&1 &
RUN_PID=$!

# ---------------------------------------------------------------- (d) smoke test
ready=0; code=000
deadline=$(( $(date +%s) + READY_TIMEOUT ))
while [[ $(date +%s) -lt $deadline ]]; do
  if ! kill -0 "$RUN_PID" 2>/dev/null; then
    log_tail 25
    die "container exited before /readyz answered 200 (last log lines above; full log: $RUN_LOG)"
  fi
  code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$PORT/readyz" || true)"
  if [[ "$code" == 200 ]]; then ready=1; break; fi
  sleep 0.2
done
t_ready="$(now)"
[[ $ready -eq 1 ]] || { log_tail 25; die "/readyz not 200 within ${READY_TIMEOUT}s (last code $code; full log: $RUN_LOG)"; }
READY_SECONDS="$(secs "$t_start" "$t_ready")"
log "/readyz 200 after ${READY_SECONDS}s"

# The serving process: first descendant of `buildah run` that is not buildah's chroot helper.
for p in $(descendants "$RUN_PID"); do
  exe="$(readlink "/proc/$p/exe" 2>/dev/null || true)"
  # skip buildah itself and its chroot helper (exe "/memfd:buildah-chroot-exec (deleted)")
  [[ -z "$exe" || "$exe" == /memfd:* || "$exe" == "$BUILDAH_EXE" ]] && continue
  [[ "$(readlink "/proc/$p/root" 2>/dev/null)" == "/" ]] && continue
  MAIN_PID="$p"; break
done
[[ -n "$MAIN_PID" ]] || die "could not find the serving process under buildah run (pid $RUN_PID)"
MAIN_UID="$(awk '/^Uid:/{print $2}' "/proc/$MAIN_PID/status")"
MAIN_CMD="$(tr '\0' ' ' <"/proc/$MAIN_PID/cmdline" | sed 's/ $//')"
[[ "$MAIN_UID" == "$EXPECTED_UID" ]] || die "serving process runs as uid $MAIN_UID, expected $EXPECTED_UID ($USER_NAME)"
[[ "$(readlink "/proc/$MAIN_PID/ns/net")" == "$(readlink /proc/self/ns/net)" ]] \
  || die "container is not in the host network namespace (chroot isolation expected)"

PRED_BODY="$WORK/predict.json"
PRED_CODE="$(curl -s -o "$PRED_BODY" -w '%{http_code}' --max-time 60 -X POST \
  -H 'Content-Type: application/json' -d "$PAYLOAD" "http://127.0.0.1:$PORT/predict" || true)"
PRED_TEXT="$(head -c 2000 "$PRED_BODY" 2>/dev/null || true)"
[[ "$PRED_CODE" == 200 ]] || { log_tail 25; die "POST /predict returned HTTP $PRED_CODE: $PRED_TEXT"; }
PROB="$("$PY" -c '
import json, math, sys
d = json.load(open(sys.argv[1]))
p = d["churn_probability"]
assert isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) and 0.0 <= p <= 1.0, p
print(p)' "$PRED_BODY" 2>/dev/null)" || die "POST /predict 200 but no churn_probability in [0,1]: $PRED_TEXT"
log "POST /predict 200: $PRED_TEXT"

if [[ $HOLD -eq 1 ]]; then
  # A caller tests the running image, then closes our standard input (or writes a line).
  echo "SERVING http://127.0.0.1:$PORT"
  log "--hold: serving at http://127.0.0.1:$PORT until standard input closes"
  read -r _ || true
fi

# What did the server write? New/changed paths in the root fs (+ the /tmp tmpfs when --read-only).
WRITES="$WORK/writes.txt"
(cd "$MNT" && find . -xdev \( -path ./proc -o -path ./sys -o -path ./dev \) -prune -o -printf '%p\t%T@\t%s\n' | sort) >"$WORK/rootfs.after"
tmp_list=""
if [[ $READ_ONLY -eq 1 ]]; then
  tmp_list="$(cd "/proc/$MAIN_PID/root/tmp" && find . -printf '/tmp/%P\n' 2>/dev/null | sed 's|/$||' | grep -v '^/tmp$' || true)"
fi
shm_list="$(find "/proc/$MAIN_PID/root/dev/shm" -mindepth 1 -user "$MAIN_UID" -printf '/dev/shm/%P\n' 2>/dev/null || true)"
printf '%s\n' "$tmp_list" "$shm_list" >"$WORK/extra-writes.txt"
"$PY" - "$SNAP_BEFORE" "$WORK/rootfs.after" "$WORK/extra-writes.txt" >"$WRITES" <<'PYEOF'
import sys
ignore = {"/run/.containerenv", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/run"}  # buildah's own mounts
def load(p):
    out = {}
    for line in open(p):
        path, mtime, size = line.rstrip("\n").split("\t")
        path = path[1:] or "/"
        out[path] = (mtime, size)
    return out
before, after = load(sys.argv[1]), load(sys.argv[2])
extra = [l.strip() for l in open(sys.argv[3]) if l.strip()]
new = sorted(set(p for p in after if p not in before) | set(extra))
changed = sorted(p for p in after if p in before and after[p] != before[p] and p not in ignore)
new = [p for p in new if p not in ignore]
newset = set(new)
def top_new(p):
    parts = p.split("/")
    for i in range(2, len(parts) + 1):
        q = "/".join(parts[:i])
        if q in newset:
            return q
    return p
groups = {}
for p in new:
    groups.setdefault(top_new(p), []).append(p)
lines = []
for top, members in sorted(groups.items()):
    n = len(members) - 1
    lines.append(f"  new      {top}" + (f"  (+{n} entries below)" if n else ""))
for p in changed:
    # a directory whose mtime changed only because of new entries is implied by them
    if any(q.startswith(p.rstrip("/") + "/") for q in newset):
        continue
    lines.append(f"  changed  {p}")
outside = sorted({l.split()[1] for l in lines if not l.split()[1].startswith(("/tmp/", "/dev/shm/"))})
print("\n".join(lines) if lines else "  (none)")
print("OUTSIDE_TMP=" + " ".join(outside))
PYEOF
OUTSIDE_TMP="$(sed -n 's/^OUTSIDE_TMP=//p' "$WRITES")"

# Stop cleanly: SIGTERM to the serving process, wait for the container to exit.
t_stop0="$(now)"
kill -TERM "$MAIN_PID" 2>/dev/null || die "could not signal serving process $MAIN_PID"
stopped=0
for _ in $(seq 1 $(( STOP_TIMEOUT * 5 ))); do
  kill -0 "$RUN_PID" 2>/dev/null || { stopped=1; break; }
  sleep 0.2
done
[[ $stopped -eq 1 ]] || die "container did not exit within ${STOP_TIMEOUT}s after SIGTERM to pid $MAIN_PID"
set +e; wait "$RUN_PID"; RUN_RC=$?; set -e
RUN_PID=""
STOP_SECONDS="$(secs "$t_stop0" "$(now)")"
# The served command's own exit status: buildah prints "subprocess exited with status N" when
# it is non-zero. A buildah rc != 0 without that line is buildah's cleanup panic (see log_tail).
CMD_RC="$(grep -oE 'subprocess exited with status [0-9]+' "$RUN_LOG" | tail -n1 | grep -oE '[0-9]+$' || true)"
STOP_NOTE=""
if [[ -z "$CMD_RC" ]]; then
  CMD_RC=0
  if [[ $RUN_RC -ne 0 ]]; then
    grep -q 'buildah.(\*Builder).Run.func' "$RUN_LOG" \
      || { log_tail 15; die "buildah run exited with status $RUN_RC after SIGTERM (log: $RUN_LOG)"; }
    STOP_NOTE=", buildah run rc $RUN_RC: its mount cleanup panicked (buildah 1.28 bug with a read-only root)"
  fi
fi

report
echo "start command:    ${ENTRY[*]}  (uid $MAIN_UID '$USER_NAME', pid $MAIN_PID: $MAIN_CMD)"
echo "network:          host network namespace (chroot isolation), port $PORT"
[[ $READ_ONLY -eq 1 ]] && echo "root filesystem:  read-only, tmpfs /tmp"
[[ ${#EXTRA_ENV[@]} -gt 0 ]] && echo "extra env:        ${EXTRA_ENV[*]}"
echo "start-to-ready:   ${READY_SECONDS}s (GET /readyz -> 200)"
echo "predict:          HTTP $PRED_CODE $PRED_TEXT"
echo "churn_probability: $PROB"
echo "stop:             SIGTERM -> server exited with status $CMD_RC in ${STOP_SECONDS}s${STOP_NOTE}"
echo "paths written by the server:"
grep -v '^OUTSIDE_TMP=' "$WRITES"
echo "writes outside /tmp: ${OUTSIDE_TMP:-none}"
if [[ $CMD_RC -ne 0 ]]; then
  log_tail 15
  die "server exited with status $CMD_RC after SIGTERM (expected 0; log: $RUN_LOG)"
fi
echo "RESULT: OK"
