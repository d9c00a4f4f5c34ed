#!/usr/bin/env bash
# Regenerates what controller-gen derives from the kubebuilder markers:
# api/v1alpha1/zz_generated.deepcopy.go, the CRDs in config/crd/bases and the
# controller's RBAC in config/rbac/role.yaml, and copies the CRDs into the Helm
# chart (charts/jetmail/crds). controller-gen is built from
# the Go module proxy into the tools cache on first use.
#
#   hack/generate.sh          # regenerate
#   hack/generate.sh --check  # fail if the committed files are stale (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
CONTROLLER_TOOLS_VERSION=v0.23.0
TOOLS=${JETMAIL_TOOLS:-$HOME/.cache/jetmail-tools}
BIN="$TOOLS/bin/controller-gen-$CONTROLLER_TOOLS_VERSION"
if [ ! -x "$BIN" ]; then
  echo "generate.sh: building controller-gen $CONTROLLER_TOOLS_VERSION" >&2
  mkdir -p "$TOOLS/bin"
  tmp=$(mktemp -d)
  GOBIN="$tmp" go install "sigs.k8s.io/controller-tools/cmd/controller-gen@$CONTROLLER_TOOLS_VERSION"
  mv "$tmp/controller-gen" "$BIN"
  rm -rf "$tmp"
fi
"$BIN" object paths=./api/... \
  crd paths=./api/... output:crd:artifacts:config=config/crd/bases \
  rbac:roleName=jetmail-controller paths=./controllers/... output:rbac:artifacts:config=config/rbac
# The Helm chart ships the same CRDs; they are copies, never edited by hand.
rm -f charts/jetmail/crds/*.yaml
mkdir -p charts/jetmail/crds
cp config/crd/bases/*.yaml charts/jetmail/crds/
if [ "${1:-}" = "--check" ]; then
  if ! git diff --exit-code -- api config/crd config/rbac charts/jetmail/crds ||
    [ -n "$(git status --porcelain -- api config/crd config/rbac charts/jetmail/crds)" ]; then
    echo "generate.sh: generated files are stale; run hack/generate.sh and commit the result" >&2
    exit 1
  fi
fi
