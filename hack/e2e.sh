#!/usr/bin/env bash
# The cluster-proof end-to-end test (README "End-to-end test"; CI runs it
# after hack/test.sh). On loopback only, it starts a real 3-node NATS
# JetStream cluster (nats-server built from the Go module proxy), the
# envtest kube-apiserver and etcd, 2 `jetmail controller`, 2 `jetmail
# gateway` and 2 `jetmail deliverer` processes, a DNS server and SMTP sinks;
# sends a few thousand messages while it kills and restarts gateways,
# deliverers, NATS nodes and the controller leader; and checks by
# Message-ID at the sinks that no acknowledged message was lost and that
# duplicates stay within what the kills can explain. It prints one line:
#
#   e2e: sent=… acknowledged=… delivered=… bounced=… duplicates=… (window=… resends=… other=…) lost=…
#
#   hack/e2e.sh                     # the whole run (about 3-5 minutes on 2 cores)
#   E2E_MESSAGES=500 hack/e2e.sh    # fewer messages
#   E2E_KEEP=1 hack/e2e.sh          # keep the run directory (logs) even on success
#
# Env: JETMAIL_TOOLS (cache root, default ~/.cache/jetmail-tools; nats-server
# is cached in $JETMAIL_TOOLS/nats-server/<version>/), NATS_SERVER_VERSION
# (default: the nats-server version in go.mod), E2E_RUN_DIR (where the
# child processes' logs go; default a new folder under $TMPDIR), E2E_MESSAGES,
# E2E_KEEP. The run directory is printed and kept when the test fails.
# The first run also builds kube-apiserver and etcd (hack/envtest.sh, about
# 4-6 minutes on 2 cores) and nats-server (about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"

echo "== nats-server"
NATS_SERVER_BIN=$(hack/nats-server.sh | tail -1)

echo "== jetmail binary"
BIN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/jetmail-e2e-bin.XXXXXX")
trap 'rm -rf "$BIN_DIR"' EXIT
go build -o "$BIN_DIR/jetmail" ./cmd/jetmail
JETMAIL_BIN="$BIN_DIR/jetmail"

echo "== envtest binaries"
KUBEBUILDER_ASSETS=$(hack/envtest.sh | tail -1)

echo "== go vet (e2e)"
go vet -tags e2e ./hack/e2e/

echo "== go test (e2e)"
export NATS_SERVER_BIN JETMAIL_BIN KUBEBUILDER_ASSETS
go test -tags e2e -count=1 -v -timeout 15m ./hack/e2e/
