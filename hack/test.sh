#!/usr/bin/env bash
# The project's one test command (README "Quick start", and what CI runs).
# Everything the tests need comes from the Go module proxy: a real NATS
# JetStream server runs in process, SMTP and DNS run over loopback, and the
# controller tests run a real kube-apiserver and etcd (envtest) that
# hack/envtest.sh builds from the module proxy and caches (first time: about
# 4-6 minutes on 2 cores; then under a second).
#
#   hack/test.sh            # format, vet, all tests with the race detector
#   SHORT=1 hack/test.sh    # skip the race detector (faster)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin:$(go env GOPATH 2>/dev/null || echo "$HOME/go")/bin"

echo "== gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then
  echo "gofmt would change:"; echo "$unformatted"; exit 1
fi

echo "== generated files (controller-gen) are up to date"
hack/generate.sh --check

echo "== go vet"
go vet ./...

echo "== envtest binaries and helm"
KUBEBUILDER_ASSETS=$(hack/envtest.sh | tail -1)
HELM=$(hack/helm.sh | tail -1)
export KUBEBUILDER_ASSETS HELM

echo "== go test"
race=-race
[ -n "${SHORT:-}" ] && race=
# Fuzz targets run their seed corpora here; fuzzing itself is
# `go test -fuzz=... ./policy/` or `./smtpgw/` by hand.
go test $race -count=1 -timeout 25m ./...

echo "== go test: the patched go-smtp (third_party/go-smtp, its own module)"
(cd third_party/go-smtp && go vet . && go test $race -count=1 -timeout 5m ./...)
