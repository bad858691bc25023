#!/usr/bin/env bash
# Builds the ssd-serve images with buildah (no daemon): ssd-serve:cpu from Dockerfile and
# ssd-serve:gpu from Dockerfile.gpu, the names deploy/k8s/overlays/{cpu-demo,gpu} run.
#
#   bash scripts/build_images.sh            # both
#   bash scripts/build_images.sh cpu        # one (cpu | gpu | base)
#
# The base: $BASE when set (e.g. BASE=docker.io/library/python:3.11-slim); otherwise the
# Dockerfiles' own bases when a registry answers, else a Debian base made here from Debian's
# packages (debootstrap bookworm + python3, then `buildah from scratch`): ssd-debian:bookworm.
# torch: the CPU image installs torch 2.13.0 the way pip on this host finds it: a find-links
# directory holding the CPU wheel ($TORCH_WHEELS, else pip's find-links) is mounted into the
# build, so no multi-GB CUDA wheel is fetched; without one, pass TORCH_INDEX_URL (a CPU wheel
# index). The GPU image takes the CUDA build of torch from the package index.
# Logs, timings and sizes: runs/images/ (build-*.log, images.json). Needs buildah (and debootstrap
# for the Debian base): installed with apt-get when missing and running as root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CPU_IMAGE=${CPU_IMAGE:-ssd-serve:cpu}
GPU_IMAGE=${GPU_IMAGE:-ssd-serve:gpu}
DEBIAN_BASE=${DEBIAN_BASE:-ssd-debian:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
LOG_DIR=${LOG_DIR:-runs/images}
ISOLATION=${ISOLATION:-chroot}  # RUN steps without a container runtime (crun cannot set rlimits here)
what=${1:-all}
mkdir -p "$LOG_DIR"

need() {  # need COMMAND PACKAGE: install PACKAGE with apt-get when COMMAND is missing
  command -v "$1" >/dev/null && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing $2 (apt-get)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$2" >"$LOG_DIR/apt-$2.log" 2>&1 \
      || { apt-get update >>"$LOG_DIR/apt-$2.log" 2>&1 \
           && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$2" >>"$LOG_DIR/apt-$2.log" 2>&1; }
  fi
  command -v "$1" >/dev/null || { echo "build_images.sh: needs $1 (apt-get install $2)" >&2; exit 1; }
}
need buildah buildah

have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }

registry_base() {  # the Dockerfile's default base, pulled within a minute, or nothing
  local ref=$1
  have_image "$ref" && { echo "$ref"; return; }
  timeout 60 buildah pull -q "$ref" >/dev/null 2>&1 && echo "$ref"
  return 0
}

debian_base() {  # a Debian bookworm base with python3 from Debian's packages (once; reused)
  if have_image "$DEBIAN_BASE"; then echo "$DEBIAN_BASE"; return; fi
  need debootstrap debootstrap
  local rootfs t0
  rootfs=$(mktemp -d /var/tmp/ssd-rootfs.XXXXXX)
  t0=$(date +%s)
  echo "== debootstrap bookworm -> $rootfs (log $LOG_DIR/debootstrap.log)" >&2
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
    "$DEBIAN_MIRROR" >"$LOG_DIR/debootstrap.log" 2>&1 \
    || { echo "debootstrap failed, see $LOG_DIR/debootstrap.log" >&2; exit 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  local ctr
  ctr=$(buildah from scratch)
  # one layer: the whole root filesystem (buildah copy keeps owners and modes)
  buildah copy --quiet "$ctr" "$rootfs" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd /bin/bash "$ctr"
  buildah commit --quiet --rm "$ctr" "$DEBIAN_BASE" >/dev/null
  rm -rf "$rootfs"
  echo "{\"image\": \"$DEBIAN_BASE\", \"seconds\": $(( $(date +%s) - t0 ))}" >"$LOG_DIR/base.json"
  echo "$DEBIAN_BASE"
}

pick_base() {  # pick_base DOCKERFILE_DEFAULT
  if [ -n "${BASE:-}" ]; then echo "$BASE"; return; fi
  local got
  got=$(registry_base "$1")
  if [ -n "$got" ]; then echo "$got"; else debian_base; fi
}

torch_wheels() {  # a directory with the torch 2.13.0 CPU wheel: $TORCH_WHEELS, else pip's find-links
  local d
  for d in ${TORCH_WHEELS:-} ${PIP_FIND_LINKS:-} $(python3 -m pip config get global.find-links 2>/dev/null || true); do
    d=${d#file://}
    if compgen -G "$d/torch-2.13.0+cpu-*.whl" >/dev/null; then echo "$d"; return; fi
  done
}

pip_cert_args() {  # the host's pip CA bundle (a TLS-inspecting proxy's), mounted for pip in RUN steps
  local cert=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
  if [ -n "$cert" ] && [ -f "$cert" ]; then
    echo --volume "$cert:/run/ssd-build-ca.crt:ro" --build-arg PIP_BUILD_CERT=/run/ssd-build-ca.crt
  fi
}

size_of() { buildah images --format '{{.Size}}' "$1" | head -1; }

build() {  # build NAME DOCKERFILE IMAGE DEFAULT_BASE [extra buildah args...]
  local name=$1 file=$2 image=$3 default_base=$4; shift 4
  local base t0 secs
  base=$(pick_base "$default_base")
  echo "== $name: $image from $file, BASE=$base (log $LOG_DIR/build-$name.log)"
  t0=$(date +%s)
  # --layers: the torch layer is reused while only the sources change
  # shellcheck disable=SC2046 # pip_cert_args: words, a path without spaces
  if ! buildah bud --isolation "$ISOLATION" --layers -f "$file" --build-arg BASE="$base" $(pip_cert_args) "$@" \
      -t "$image" . \
      >"$LOG_DIR/build-$name.log" 2>&1; then
    tail -30 "$LOG_DIR/build-$name.log" >&2
    echo "build_images.sh: the $name build failed (full log $LOG_DIR/build-$name.log)" >&2
    exit 1
  fi
  secs=$(( $(date +%s) - t0 ))
  echo "== $name: built $image in ${secs}s, $(size_of "$image")"
  printf '{"image": "%s", "dockerfile": "%s", "base": "%s", "seconds": %d, "size": "%s", "commit": "%s", "date": "%s"}\n' \
    "$image" "$file" "$base" "$secs" "$(size_of "$image")" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    "$(date -u +%FT%TZ)" >"$LOG_DIR/$name.json"
}

build_cpu() {
  local wheels args=()
  wheels=$(torch_wheels)
  if [ -n "$wheels" ]; then
    args+=(--volume "$wheels:/wheels:ro" --build-arg TORCH_FIND_LINKS=/wheels)
  elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    args+=(--build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL")
  else
    echo "build_images.sh: no torch 2.13.0 CPU wheel found (set TORCH_WHEELS=DIR or TORCH_INDEX_URL);" \
         "the CPU image would take the multi-GB CUDA build" >&2
  fi
  build cpu Dockerfile "$CPU_IMAGE" docker.io/library/python:3.11-slim "${args[@]}"
}

build_gpu() {
  build gpu Dockerfile.gpu "$GPU_IMAGE" docker.io/nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
}

case "$what" in
  base) debian_base ;;
  cpu) build_cpu ;;
  gpu) build_gpu ;;
  all) build_cpu; build_gpu ;;
  *) echo "usage: build_images.sh [all|cpu|gpu|base]" >&2; exit 2 ;;
esac
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -E 'ssd-(serve|debian)' || true
