#!/usr/bin/env bash
# Build (once) the tools of the Kubernetes integration tier (tests/test_k8s_integration.py):
#   - kube-apiserver, built offline from Debian's `kubernetes` source package (1.20.x, vendored
#     Go modules) with Debian's golang-go: `make WHAT=cmd/kube-apiserver` (plain `go build` does
#     not work with its vendoring; the make rules need rsync). No registry ships the binary.
#   - etcd, from Debian's etcd-server package.
# The binary is cached OUTSIDE the repository:
#   ${SSD_K8S_CACHE:-$HOME/.cache/ssd-k8s}/bin/kube-apiserver   (+ bin/etcd, a link)
# and the script does nothing more when it is there (idempotent). Set SSD_K8S_REBUILD=1 to
# rebuild, SSD_K8S_KEEP_SRC=1 to keep the unpacked source tree after the build.
#
# The source package is fetched with `apt-get source` through a PRIVATE apt configuration whose
# deb-src entries are derived, at run time, from this machine's own apt sources (the same
# mirrors, suites and keys, with `Types: deb-src`); the machine's apt configuration is not
# changed. Needs root (or sudo) for apt-get install; about 5-10 minutes of 2 cores for the build.
set -euo pipefail

CACHE=${SSD_K8S_CACHE:-$HOME/.cache/ssd-k8s}
BIN=$CACHE/bin
APISERVER=$BIN/kube-apiserver
SRC_PKG=${SSD_K8S_SRC_PKG:-kubernetes}

log() { echo "[build_kube_apiserver] $*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else SUDO="__no_root__"; fi
fi

apt_install() {
  # apt_install PKG...: install Debian packages that are missing.
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  if [ "$SUDO" = "__no_root__" ]; then
    log "need root to install: ${missing[*]}"; exit 1
  fi
  log "apt-get install ${missing[*]}"
  $SUDO apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

find_etcd() {
  for c in "${SSD_ETCD:-}" "$BIN/etcd" "$(command -v etcd 2>/dev/null || true)" /usr/bin/etcd; do
    if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  return 1
}

mkdir -p "$BIN"

# --- etcd -------------------------------------------------------------------------------------
if ! find_etcd >/dev/null; then
  apt_install etcd-server
fi
ETCD=$(find_etcd) || { log "etcd not found after installing etcd-server"; exit 1; }
[ "$ETCD" = "$BIN/etcd" ] || ln -sf "$ETCD" "$BIN/etcd"
log "etcd: $ETCD ($("$ETCD" --version 2>/dev/null | head -1))"

# --- kube-apiserver ---------------------------------------------------------------------------
if [ -x "$APISERVER" ] && [ -z "${SSD_K8S_REBUILD:-}" ]; then
  log "cached: $APISERVER ($("$APISERVER" --version 2>/dev/null || echo '?'))"
  exit 0
fi

apt_install golang-go rsync dpkg-dev make

# A private apt configuration with deb-src twins of this machine's own sources.
APTDIR=$CACHE/apt
rm -rf "$APTDIR"
mkdir -p "$APTDIR/sources.list.d" "$APTDIR/lists/partial" "$APTDIR/archives/partial"
: > "$APTDIR/sources.list"
n=0
for f in /etc/apt/sources.list.d/*.sources; do
  [ -e "$f" ] || continue
  # deb822: every stanza's Types becomes deb-src (the rest: URIs, Suites, Components, Signed-By kept)
  sed -E 's/^Types:.*$/Types: deb-src/' "$f" > "$APTDIR/sources.list.d/$(basename "$f")"
  n=$((n + 1))
done
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
  [ -e "$f" ] || continue
  # one-line format: deb [opts] URI suite comps -> deb-src [opts] URI suite comps
  grep -E '^[[:space:]]*deb[[:space:]]' "$f" | sed -E 's/^[[:space:]]*deb[[:space:]]/deb-src /' \
    >> "$APTDIR/sources.list" || true
  n=$((n + 1))
done
[ "$n" -gt 0 ] || { log "no apt sources found under /etc/apt to derive deb-src entries from"; exit 1; }
APT_OPTS=(
  -o "Dir::Etc::SourceList=$APTDIR/sources.list"
  -o "Dir::Etc::SourceParts=$APTDIR/sources.list.d"
  -o "Dir::State::Lists=$APTDIR/lists"
  -o "Dir::Cache::Archives=$APTDIR/archives"
  -o "Dir::Cache::pkgcache="
  -o "Dir::Cache::srcpkgcache="
  -o "APT::Sandbox::User=root"
)
log "apt-get update (deb-src, private lists in $APTDIR)"
apt-get "${APT_OPTS[@]}" update -qq >&2

WORK=$CACHE/src
rm -rf "$WORK"
mkdir -p "$WORK"
log "apt-get source $SRC_PKG"
(cd "$WORK" && apt-get "${APT_OPTS[@]}" source -qq "$SRC_PKG" >&2)
TREE=$(find "$WORK" -mindepth 1 -maxdepth 1 -type d | head -1)
[ -n "$TREE" ] && [ -f "$TREE/Makefile" ] || { log "no unpacked source tree in $WORK"; exit 1; }
DEB_VERSION=$(cd "$TREE" && dpkg-parsechangelog -S Version)
# The upstream version for `kube-apiserver --version` (Debian's "1.20.5+really1.20.2-1.1" -> v1.20.2).
UPSTREAM=${DEB_VERSION%%-*}
UPSTREAM=${UPSTREAM##*really}
UPSTREAM=${UPSTREAM#*:}
log "source: $TREE (Debian $DEB_VERSION, upstream v$UPSTREAM); go: $(go version)"

start=$(date +%s)
(
  cd "$TREE"
  export GOPROXY=off GOFLAGS=-mod=vendor GO111MODULE=on
  export GOCACHE=$CACHE/gocache GOPATH=$CACHE/gopath
  export KUBE_GIT_VERSION="v$UPSTREAM" KUBE_GIT_TREE_STATE=clean
  export KUBE_GIT_COMMIT=${KUBE_GIT_COMMIT:-debian-$DEB_VERSION}
  make WHAT=cmd/kube-apiserver >&2
)
built=$(find "$TREE/_output" -type f -name kube-apiserver -perm -u+x | head -1)
[ -n "$built" ] || { log "build produced no kube-apiserver"; exit 1; }
install -m 0755 "$built" "$APISERVER.tmp"
mv "$APISERVER.tmp" "$APISERVER"
echo "$DEB_VERSION" > "$BIN/kube-apiserver.debian-version"
log "built $APISERVER in $(( $(date +%s) - start )) s: $("$APISERVER" --version)"
if [ -z "${SSD_K8S_KEEP_SRC:-}" ]; then
  rm -rf "$WORK" "$CACHE/gopath"
fi
