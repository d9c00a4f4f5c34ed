#!/usr/bin/env bash
# Builds helm from the Go module proxy into the tools cache (once) and prints
# its path. The chart test (charts/chart_test.go) runs it through $HELM:
#
#   export HELM=$(hack/helm.sh | tail -1)
#
# Env: JETMAIL_TOOLS (cache root, default ~/.cache/jetmail-tools),
#      HELM_VERSION (default below). GOFLAGS/GOPROXY are honoured.
# Progress goes to stderr; the last stdout line is the absolute helm path.
set -euo pipefail
export PATH="$PATH:/usr/local/go/bin"

HELM_VERSION=${HELM_VERSION:-v3.16.4}
TOOLS=${JETMAIL_TOOLS:-$HOME/.cache/jetmail-tools}
mkdir -p "$TOOLS/bin"
TOOLS=$(realpath "$TOOLS")
BIN="$TOOLS/bin/helm-$HELM_VERSION"
log() { echo "helm.sh: $*" >&2; }

ready() { [ -x "$BIN" ] && [ "$("$BIN" version --template '{{.Version}}' 2>/dev/null)" = "$HELM_VERSION" ]; }
if ready; then echo "$BIN"; exit 0; fi

# One builder at a time; a second caller waits, then finds the cache filled.
exec 9>"$BIN.lock"
flock 9
if ready; then echo "$BIN"; exit 0; fi

command -v go >/dev/null || { log "go not found"; exit 1; }
log "building helm $HELM_VERSION from the Go module proxy (first run only)"
t=$SECONDS
tmp=$(mktemp -d "$TOOLS/bin/helm-build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# Stamp the versions like helm's Makefile does: `helm version`, and the
# Kubernetes version that `helm template` and `helm lint` assume without a
# cluster (that of the client-go helm is built with; unstamped it is 1.20).
gomod=$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" |
  sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
[ -f "$gomod" ] || { log "cannot fetch helm.sh/helm/v3@$HELM_VERSION go.mod"; exit 1; }
cg=$(awk '$1=="k8s.io/client-go"{print $2; exit}' "$gomod")   # v0.31.3
minor=$(echo "$cg" | cut -d. -f2)
[ -n "$minor" ] || { log "no k8s.io/client-go in $gomod"; exit 1; }
ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
for p in pkg/chartutil pkg/lint/rules; do
  ld+=" -X helm.sh/helm/v3/$p.k8sVersionMajor=1 -X helm.sh/helm/v3/$p.k8sVersionMinor=$minor"
done
(cd "$tmp" && CGO_ENABLED=0 GOWORK=off GOBIN="$tmp" \
  go install -trimpath -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION") >&2
mv -f "$tmp/helm" "$BIN"
ready || { log "$BIN does not run"; exit 1; }
log "built helm $HELM_VERSION in $((SECONDS - t))s"
echo "$BIN"
