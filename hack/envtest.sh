#!/usr/bin/env bash
# Builds the controller-runtime envtest binaries (kube-apiserver, etcd,
# kubectl) from the Go module proxy, caches them, and prints the asset dir.
# setup-envtest cannot be used here: it downloads prebuilt binaries.
#
#   export KUBEBUILDER_ASSETS=$(hack/envtest.sh | tail -1)
#
# Env: JETMAIL_TOOLS (cache root, default ~/.cache/jetmail-tools),
#      K8S_VERSION (default v1.37.0, matching k8s.io/* v0.37.0 used by
#      controller-runtime v0.25.2), ETCD_VERSION (default: what that
#      k8s.io/kubernetes go.mod requires), ENVTEST_BUILD_KUBECTL=1 (build
#      kubectl even if /usr/bin/kubectl exists). GOFLAGS/GOPROXY are honoured.
# First build ~4-6 min on 2 cores (cold Go build cache); cached runs < 1 s.
# Progress goes to stderr; the last stdout line is the absolute asset dir.
set -euo pipefail
export PATH="$PATH:/usr/local/go/bin"

K8S_VERSION=${K8S_VERSION:-v1.37.0}
TOOLS=${JETMAIL_TOOLS:-$HOME/.cache/jetmail-tools}
DIR="$TOOLS/envtest/k8s-$K8S_VERSION"
log() { echo "envtest.sh: $*" >&2; }

# Fast path: all three binaries exist and run, apiserver has the right version.
ready() {
  [ -n "${ENVTEST_BUILD_KUBECTL:-}" ] && [ -L "$DIR/kubectl" ] && return 1
  [ -x "$DIR/kube-apiserver" ] && [ -x "$DIR/etcd" ] && [ -x "$DIR/kubectl" ] || return 1
  "$DIR/kube-apiserver" --version 2>/dev/null | grep -qx "Kubernetes $K8S_VERSION" || return 1
  "$DIR/etcd" --version >/dev/null 2>&1 || return 1
  "$DIR/kubectl" version --client >/dev/null 2>&1
}
if ready; then echo "$DIR"; exit 0; fi

mkdir -p "$DIR"
DIR=$(realpath "$DIR")
# One builder at a time; a second caller waits, then finds the cache filled.
exec 9>"$DIR.lock"
flock 9
if ready; then echo "$DIR"; exit 0; fi

command -v go >/dev/null || { log "go not found"; exit 1; }
WORK=$(mktemp -d "$TOOLS/envtest/build.XXXXXX")   # throwaway modules, never in the repo
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
export CGO_ENABLED=0 GOWORK=off GOFLAGS="${GOFLAGS:-} -mod=mod"

# k8s.io/kubernetes v1.X.Y's staging modules are published as k8s.io/<name> v0.X.Y.
minor_patch=${K8S_VERSION#v1.}
STAGING_VERSION="v0.$minor_patch"
KMOD=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
  sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
[ -f "$KMOD" ] || { log "cannot fetch k8s.io/kubernetes@$K8S_VERSION go.mod"; exit 1; }
ETCD_VERSION=${ETCD_VERSION:-$(awk '$1=="go.etcd.io/etcd/server/v3"{print $2; exit}' "$KMOD")}

build_kube() { # build_kube <cmd>...: builds k8s.io/kubernetes/cmd/<cmd> into $DIR
  local m="$WORK/kubernetes"
  if [ ! -f "$m/go.mod" ]; then
    mkdir -p "$m"
    {
      echo "module envtest.local/kubernetes"
      echo "go 1.26"
      echo "require k8s.io/kubernetes $K8S_VERSION"
      # Every `k8s.io/X => ./staging/src/k8s.io/X` replace becomes k8s.io/X v0.minor.patch.
      sed -n 's#^[[:space:]]*\(k8s.io/[^ ]*\) => ./staging/src/k8s.io/.*#replace \1 => \1 '"$STAGING_VERSION"'#p' "$KMOD"
    } >"$m/go.mod"
  fi
  local pkgs=() c
  for c in "$@"; do pkgs+=("k8s.io/kubernetes/cmd/$c@$K8S_VERSION"); done
  (cd "$m" && go get "${pkgs[@]}") >&2
  # Stamp the version like the upstream release build does (hack/lib/version.sh).
  local v=k8s.io/component-base/version minor=${minor_patch%%.*}
  local ld="-s -w -X $v.gitVersion=$K8S_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor"
  ld+=" -X $v.gitTreeState=clean -X $v.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  for c in "$@"; do
    log "building $c $K8S_VERSION (a few minutes on first run)"
    local t=$SECONDS
    (cd "$m" && go build -trimpath -ldflags "$ld" -o "$WORK/$c" "k8s.io/kubernetes/cmd/$c") >&2
    mv -f "$WORK/$c" "$DIR/$c"
    log "built $c in $((SECONDS - t))s"
  done
}

if ! "$DIR/kube-apiserver" --version 2>/dev/null | grep -qx "Kubernetes $K8S_VERSION"; then
  build_kube kube-apiserver
fi

if ! "$DIR/etcd" --version >/dev/null 2>&1; then
  log "building etcd $ETCD_VERSION"
  t=$SECONDS m="$WORK/etcd"
  mkdir -p "$m"
  printf 'module envtest.local/etcd\n\ngo 1.26\n' >"$m/go.mod"
  cat >"$m/main.go" <<'EOF'
// etcd server, the same entry point as upstream's etcd binary.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
  (cd "$m" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" && go mod tidy &&
    go build -trimpath -ldflags "-s -w" -o "$WORK/etcd-bin" .) >&2
  mv -f "$WORK/etcd-bin" "$DIR/etcd"
  log "built etcd in $((SECONDS - t))s"
fi

if [ -n "${ENVTEST_BUILD_KUBECTL:-}" ] && [ -L "$DIR/kubectl" ] ||
  ! "$DIR/kubectl" version --client >/dev/null 2>&1; then
  rm -f "$DIR/kubectl"
  if [ -x /usr/bin/kubectl ] && [ -z "${ENVTEST_BUILD_KUBECTL:-}" ]; then
    log "using /usr/bin/kubectl ($(/usr/bin/kubectl version --client 2>/dev/null | head -1))"
    ln -s /usr/bin/kubectl "$DIR/kubectl"
  else
    build_kube kubectl
  fi
fi

ready || { log "binaries in $DIR do not work"; exit 1; }
log "envtest assets ready: kube-apiserver $K8S_VERSION, etcd $ETCD_VERSION"
echo "$DIR"
