#!/usr/bin/env bash
# Build a local stand-in for BentoML's default base image (python:3.11-slim) with
# debootstrap (Debian bookworm, python3 = 3.11) and commit it into buildah's local
# storage. No Docker engine or container registry is needed: only Debian packages.
#
#   deploy/image/make-base.sh [--image NAME] [--mirror URL] [--force] [--no-upgrade]
#                             [--cache-dir DIR | --no-cache] [--print-image]
#
# The image is tagged by its recipe (this file's SHA-256): localhost/bank-churn-base:bookworm-<recipe>,
# so a changed recipe is a new image, never a stale one. In order, it:
#   1. does nothing if that image is already in buildah's storage (--force rebuilds);
#   2. else loads it from the cache, DIR/bank-churn-base-bookworm-<recipe>.oci.tar (an OCI archive;
#      DIR = $BANK_CHURN_IMAGE_CACHE, default ~/.cache/bank-churn/images): what a CI cache keeps;
#   3. else builds it (debootstrap, ~2-3 min) and writes that archive.
# --print-image prints the image name for this recipe and exits.
# Storage driver: vfs (STORAGE_DRIVER), isolation: chroot (BUILDAH_ISOLATION).
set -Eeuo pipefail

RECIPE_HASH="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)"
IMAGE="${BASE_IMAGE:-localhost/bank-churn-base:bookworm-$RECIPE_HASH}"
CACHE_DIR="${BANK_CHURN_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bank-churn/images}"
SUITE="bookworm"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
FORCE=0
UPGRADE=1
PRINT=0

die() { echo "make-base.sh: ERROR: $*" >&2; exit 1; }
log() { echo "make-base.sh: $*" >&2; }

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --image) [[ $# -ge 2 ]] || die "--image needs a value"; IMAGE="$2"; shift 2 ;;
    --image=*) IMAGE="${1#*=}"; shift ;;
    --mirror) [[ $# -ge 2 ]] || die "--mirror needs a value"; MIRROR="$2"; shift 2 ;;
    --mirror=*) MIRROR="${1#*=}"; shift ;;
    --force) FORCE=1; shift ;;
    --no-upgrade) UPGRADE=0; shift ;;
    --cache-dir) [[ $# -ge 2 ]] || die "--cache-dir needs a value"; CACHE_DIR="$2"; shift 2 ;;
    --cache-dir=*) CACHE_DIR="${1#*=}"; shift ;;
    --no-cache) CACHE_DIR=""; shift ;;
    --print-image) PRINT=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

if [[ $PRINT -eq 1 ]]; then echo "$IMAGE"; exit 0; fi

# shellcheck source=deploy/image/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Packages on top of debootstrap's minbase: what python:3.11-slim has and serving needs.
# python3/python3-venv/python3-pip give python3.11 + pip + venv (the Dockerfile pip-installs
# uv, then makes a venv); ca-certificates/netbase/tzdata as in python:*-slim; bash, passwd
# (groupadd/useradd) and procps for the Dockerfile's steps and the entrypoint. No compiler,
# git or headers: every package installs from a wheel, and the Bento's Dockerfile template
# (deploy/image/Dockerfile.template) drops BentoML's `apt-get install build-essential git`.
PACKAGES=(
  python3 python3-venv python3-pip
  ca-certificates netbase tzdata
  bash passwd procps
)
ARCHIVE="${CACHE_DIR:+$CACHE_DIR/$(basename "${IMAGE%%:*}")-${IMAGE##*:}.oci.tar}"

if buildah inspect --type image "$IMAGE" >/dev/null 2>&1; then
  if [[ $FORCE -eq 0 ]]; then
    log "base image $IMAGE (recipe $RECIPE_HASH) is in buildah's storage"
    exit 0
  fi
  log "--force: rebuilding $IMAGE"
  old_id="$(buildah inspect --type image --format '{{.FromImageID}}' "$IMAGE" 2>/dev/null || true)"
elif [[ -n "$ARCHIVE" && -s "$ARCHIVE" && $FORCE -eq 0 ]]; then
  t0=$(date +%s)
  if id="$(buildah pull --quiet "oci-archive:$ARCHIVE" 2>/dev/null | tail -n1)" && [[ -n "$id" ]] \
     && [[ "$(buildah inspect --type image --format '{{index .OCIv1.Config.Labels "bank-churn.base.recipe"}}' "$id")" == "$RECIPE_HASH" ]] \
     && buildah tag "$id" "$IMAGE"; then
    log "base image $IMAGE loaded from the cache $ARCHIVE in $(( $(date +%s) - t0 ))s"
    exit 0
  fi
  log "WARNING: could not load $ARCHIVE; building the base image instead"
fi

start=$(date +%s)
ctr=""
cleanup() {
  local rc=$?
  if [[ -n "$ctr" ]]; then
    buildah umount "$ctr" >/dev/null 2>&1 || true
    buildah rm "$ctr" >/dev/null 2>&1 || true
  fi
  [[ $rc -eq 0 ]] || echo "make-base.sh: ERROR: base image build failed (exit $rc)" >&2
}
trap cleanup EXIT

ctr="$(buildah from --name "bank-churn-base-build-$$" scratch)" || die "buildah from scratch failed (storage driver $STORAGE_DRIVER)"
root="$(buildah mount "$ctr")" || die "buildah mount failed"
log "debootstrap $SUITE (minbase + ${#PACKAGES[@]} packages) from $MIRROR into $root"
include="$(IFS=,; echo "${PACKAGES[*]}")"
dblog="$(mktemp /tmp/make-base-debootstrap.XXXXXX.log)"
if ! debootstrap --variant=minbase --components=main --include="$include" \
    "$SUITE" "$root" "$MIRROR" >"$dblog" 2>&1; then
  tail -n 20 "$dblog" >&2
  die "debootstrap failed (full log: $dblog; last lines above; check that $MIRROR is reachable)"
fi
rm -f "$dblog"
log "debootstrap done after $(( $(date +%s) - start ))s"

# --- slim-image conventions (as in debian:bookworm-slim, python:3.11-slim's parent) ---
cat >"$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$root"/usr/share/{man,groff,info,lintian,linda}/* 2>/dev/null || true
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} + 2>/dev/null || true
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
echo 'APT::Install-Recommends "false";' >"$root/etc/apt/apt.conf.d/docker-no-recommends"

# Full bookworm sources (debootstrap only writes "main" of the release itself).
rm -f "$root/etc/apt/sources.list"
cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF

# Container hygiene: no host identity baked in; empty /dev (the runtime provides it).
rm -f "$root/etc/hostname"
: >"$root/etc/resolv.conf"
find "$root/dev" -mindepth 1 -delete 2>/dev/null || true

if [[ $UPGRADE -eq 1 ]]; then
  log "apt-get update && dist-upgrade (bookworm-updates + security)"
  buildah run --isolation chroot "$ctr" -- sh -c \
    'export DEBIAN_FRONTEND=noninteractive; apt-get update -q >/dev/null && apt-get -q -y dist-upgrade >/dev/null 2>&1' \
    || die "apt-get dist-upgrade inside the base rootfs failed (security mirror $SECURITY_MIRROR reachable?)"
fi

# python:3.11-slim has python/pip at /usr/local/bin and no PEP 668 marker, so the
# generated Dockerfile's `pip install uv` (as root, system-wide) works there. Done
# after the upgrade: a python3.11 security update re-creates the marker file, and
# /etc/pip.conf keeps pip usable even if a later apt-get in the Dockerfile does too.
pyver="$(chroot "$root" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
  || die "python3 does not run inside the new rootfs"
[[ "$pyver" == "3.11" ]] || die "Debian $SUITE python3 is $pyver, expected 3.11"
pyfull="$(chroot "$root" python3 -c 'import platform; print(platform.python_version())')"
rm -f "$root/usr/lib/python3.11/EXTERNALLY-MANAGED"
printf '[global]\nbreak-system-packages = true\nroot-user-action = ignore\n' >"$root/etc/pip.conf"
# uv (which the Dockerfile pip-installs and then uses for all Python packages)
# ships its own CA roots; make it use the system trust store like pip/apt do, so a
# site CA bundle (e.g. bind-mounted by build.sh at build time) is honoured.
mkdir -p "$root/etc/uv"
printf 'system-certs = true\n' >"$root/etc/uv/uv.toml"
for n in python3.11 python3 python; do ln -sf /usr/bin/python3.11 "$root/usr/local/bin/$n"; done
for n in pip3.11 pip3 pip; do ln -sf /usr/bin/pip3 "$root/usr/local/bin/$n"; done

buildah config \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 \
  --env PYTHON_VERSION="$pyfull" \
  --cmd python3 \
  --os linux --arch "$(dpkg --print-architecture)" \
  --label org.opencontainers.image.title="bank-churn-base" \
  --label org.opencontainers.image.description="debootstrap $SUITE minbase + python$pyfull; local stand-in for python:3.11-slim" \
  --label bank-churn.base.recipe="$RECIPE_HASH" \
  "$ctr"

# Sanity: the tools the generated Dockerfile's RUN steps call.
buildah run --isolation chroot "$ctr" -- bash -c \
  'set -e; test ! -e /usr/lib/python3.11/EXTERNALLY-MANAGED
   for c in python3.11 python3 pip groupadd useradd chown chmod mkdir apt-get bash; do command -v $c >/dev/null || { echo "missing $c"; exit 1; }; done
   python3 -m venv --help >/dev/null; python3 -c "import ssl, sqlite3, ctypes, venv"' \
  || die "sanity check of the base rootfs failed"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
       "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/tmp/* "$root"/root/.cache 2>/dev/null || true

buildah umount "$ctr" >/dev/null
buildah commit --quiet --rm "$ctr" "$IMAGE" >/dev/null || die "buildah commit $IMAGE failed"
ctr=""
if [[ -n "${old_id:-}" ]]; then buildah rmi "$old_id" >/dev/null 2>&1 || true; fi
size="$(buildah images --format '{{.Size}}' "$IMAGE" | sed -n 1p)"
log "built $IMAGE (python $pyfull, $size) in $(( $(date +%s) - start ))s"
if [[ -n "$ARCHIVE" ]]; then
  mkdir -p "$CACHE_DIR"
  rm -f "$ARCHIVE.tmp"
  if buildah push --quiet "$IMAGE" "oci-archive:$ARCHIVE.tmp:$IMAGE" >/dev/null 2>&1 && mv -f "$ARCHIVE.tmp" "$ARCHIVE"; then
    log "cached as $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1))"
  else
    rm -f "$ARCHIVE.tmp"; log "WARNING: could not write the cache archive $ARCHIVE (the image is built all the same)"
  fi
fi
