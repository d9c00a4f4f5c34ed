#!/usr/bin/env bash
# Cluster scaling benchmark (a benchmark, not a test): on the machinery of
# the cluster proof (hack/e2e.sh: nats-server processes, envtest with a
# controller, gateways and deliverers of the real binary, DNS and SMTP
# sinks on loopback), TestClusterScale (hack/e2e/scale_test.go) measures
# per configuration the messages per second the gateways accept (250s) and
# deliver end to end (arrivals at the sinks), and the CPU split between
# jetmail, nats-server, the test process (load generator and sinks) and the
# rest (controller, kube-apiserver, etcd), from /proc/<pid>/stat and
# getrusage over the measured window. No faults; plain fast sinks.
#
# The matrix: gateway+deliverer pairs x JetStream replicas (R1: one
# nats-server; R3: three) x nats-server fsync (NATS's default sync
# interval; sync_interval: always). Each configuration gets fresh NATS
# servers and jetmail processes, a warm-up, then E2E_SCALE_MESSAGES
# messages of E2E_SCALE_SIZE bytes, one recipient each, over
# E2E_SCALE_SESSIONS SMTP sessions spread over the gateways, each keeping
# its connection.
#
#   hack/bench-cluster.sh                                   # the whole matrix (12 configurations, ~15-20 min on 2 cores)
#   E2E_SCALE_PAIRS="1 2" E2E_SCALE_REPLICAS=3 hack/bench-cluster.sh
#   E2E_SCALE_FSYNC=always E2E_SCALE_MESSAGES=500 hack/bench-cluster.sh
#   E2E_SCALE_PPROF=1 hack/bench-cluster.sh                 # + CPU profiles of gw-0 and dl-0 (top functions)
#
# Env: E2E_SCALE_PAIRS ("1 2 4"), E2E_SCALE_REPLICAS ("1 3"),
# E2E_SCALE_FSYNC ("default always"), E2E_SCALE_MESSAGES (3000),
# E2E_SCALE_SIZE (5120), E2E_SCALE_SESSIONS (20), E2E_SCALE_PPROF (off),
# E2E_SCALE_PPROF_SECONDS (5, from the start of the measured load),
# E2E_SCALE_OUT (where the output, profiles and their summaries are kept;
# default a new folder under $TMPDIR), and those of hack/e2e.sh
# (JETMAIL_TOOLS, NATS_SERVER_VERSION, E2E_RUN_DIR, E2E_KEEP).
#
# The table's columns are explained above TestClusterScale. "machine CPU s,
# others' share" is the whole machine's busy CPU over the measured window
# (/proc/stat) and the part of it used by processes outside the run: when
# that share is large, other work on the machine took CPU from the run and
# its rates are low. Keep the machine otherwise idle: the figures are for
# comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
log() { echo "bench-cluster.sh: $*" >&2; }

echo "== nats-server"
NATS_SERVER_BIN=$(hack/nats-server.sh | tail -1)

echo "== jetmail binary"
BIN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/jetmail-scale-bin.XXXXXX")
trap 'rm -rf "$BIN_DIR"' EXIT
go build -o "$BIN_DIR/jetmail" ./cmd/jetmail
JETMAIL_BIN="$BIN_DIR/jetmail"

echo "== envtest binaries"
KUBEBUILDER_ASSETS=$(hack/envtest.sh | tail -1)

OUT=${E2E_SCALE_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/jetmail-scale-out.XXXXXX")}
mkdir -p "$OUT"
echo "== go test (TestClusterScale); output in $OUT"
echo "   pairs=\"${E2E_SCALE_PAIRS:-1 2 4}\" replicas=\"${E2E_SCALE_REPLICAS:-1 3}\" fsync=\"${E2E_SCALE_FSYNC:-default always}\" messages=${E2E_SCALE_MESSAGES:-3000} size=${E2E_SCALE_SIZE:-5120} sessions=${E2E_SCALE_SESSIONS:-20} on $(nproc) cores"
export NATS_SERVER_BIN JETMAIL_BIN KUBEBUILDER_ASSETS E2E_SCALE=1 E2E_SCALE_OUT="$OUT"
rc=0
go test -tags e2e -count=1 -v -timeout 90m -run '^TestClusterScale$' ./hack/e2e/ >"$OUT/test.log" 2>&1 || rc=$?

# The rows print as each configuration ends, so a partial matrix is kept.
{
  echo
  sed -n 's/^scale-header: //p' "$OUT/test.log"
  sed -n 's/^scale-row: //p' "$OUT/test.log"
  echo
  sed -n 's/^scale-cpu: //p' "$OUT/test.log"
} | tee "$OUT/table.md"
if grep -q '^scale-pprof: ' "$OUT/test.log"; then
  sed -n 's/^scale-pprof: //p' "$OUT/test.log" >"$OUT/pprof.txt"
  echo
  echo "CPU profiles: $OUT/*.cpu.pprof, top functions in $OUT/pprof.txt"
fi
if [ "$rc" != 0 ]; then
  log "go test failed (exit $rc); the last lines of $OUT/test.log:"
  tail -40 "$OUT/test.log" >&2
fi
exit "$rc"
