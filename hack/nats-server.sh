#!/usr/bin/env bash
# Builds nats-server from the Go module proxy (the version go.mod uses, or
# NATS_SERVER_VERSION), caches it, and prints its path on the last stdout
# line, as hack/envtest.sh does for the envtest binaries:
#
#   NATS_SERVER_BIN=$(hack/nats-server.sh | tail -1)
#
# Env: JETMAIL_TOOLS (cache root, default ~/.cache/jetmail-tools; the binary
# is $JETMAIL_TOOLS/nats-server/<version>/nats-server). First build about a
# minute on 2 cores; then under a second. Progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
log() { echo "nats-server.sh: $*" >&2; }

TOOLS=${JETMAIL_TOOLS:-$HOME/.cache/jetmail-tools}
NATS_SERVER_VERSION=${NATS_SERVER_VERSION:-$(go list -m -f '{{.Version}}' github.com/nats-io/nats-server/v2)}
NATS_DIR="$TOOLS/nats-server/$NATS_SERVER_VERSION"
NATS_SERVER_BIN="$NATS_DIR/nats-server"
ready() { "$NATS_SERVER_BIN" --version 2>/dev/null | grep -q "v${NATS_SERVER_VERSION#v}\$"; }
if ! ready; then
  mkdir -p "$NATS_DIR"
  # One builder at a time; a second caller waits, then finds the cache filled.
  exec 8>"$NATS_DIR.lock"
  flock 8
  if ! ready; then
    log "building nats-server $NATS_SERVER_VERSION from the module proxy"
    (cd "$NATS_DIR" && GOBIN="$NATS_DIR" CGO_ENABLED=0 GOWORK=off GOFLAGS=-mod=mod \
      go install -trimpath "github.com/nats-io/nats-server/v2@$NATS_SERVER_VERSION") >&2
  fi
  ready || { log "$NATS_SERVER_BIN does not report $NATS_SERVER_VERSION"; exit 1; }
  exec 8>&-
fi
"$NATS_SERVER_BIN" --version >&2
echo "$NATS_SERVER_BIN"
