#!/usr/bin/env bash
# Memory of `jetmail serve` through a burst of large messages (issue 11:
# "40 concurrent 9 MB messages"), receiving and delivering apart:
#
#   1. receiving: `serve --no-deliver` takes COUNT messages of SIZE octets
#      over COUNT concurrent sessions (smtp-source -s COUNT -l SIZE -m COUNT);
#   2. delivering: serve restarts on the same data directory with delivery
#      on, relaying to hack/sinkcount, until the sink has all COUNT;
#   3. after: the queue is empty; serve keeps running for AFTER seconds.
#
# VmRSS and the Go heap in use (go_memstats_heap_inuse_bytes on /metrics) are
# sampled every 0.5 s; the script prints each phase's peak and the samples
# of the last phase. fsync is on (the default).
#
#   hack/bench-large.sh                     # COUNT=40 SIZE=9000000 AFTER=150
#   BIN=/tmp/old/jetmail hack/bench-large.sh  # another build, to compare
#   KEEP=1 hack/bench-large.sh              # keep the work directory
#
# Only loopback is used. Needs smtp-source (Debian's postfix package; the
# script installs it when missing, as root). Keep the machine otherwise idle.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH

COUNT=${COUNT:-40}
SIZE=${SIZE:-9000000}
AFTER=${AFTER:-150}
SINK_PORT=${SINK_PORT:-2640}
JM_PORT=${JM_PORT:-2641}
NATS_PORT=${NATS_PORT:-4241}

if ! command -v smtp-source >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "bench-large: smtp-source missing (apt-get install postfix)" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null
fi

work=$(mktemp -d /tmp/bench-large.XXXXXX)
JM="" SINK=""
cleanup() {
  for p in $JM $SINK; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

if [ -n "${BIN:-}" ]; then cp "$BIN" "$work/jetmail"; else go build -o "$work/jetmail" ./cmd/jetmail; fi
go build -o "$work/sinkcount" ./hack/sinkcount
echo "== $COUNT messages of $SIZE octets over $COUNT sessions ($(git rev-parse --short HEAD 2>/dev/null || echo '?')${BIN:+, binary $BIN}); $(nproc) cores"

wait_port() { for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

# start NAME FLAGS...: serve in the background ($JM), its metrics address in $MADDR.
start() {
  local name=$1; shift
  "$work/jetmail" serve --data-dir "$work/data" --smtp-listen "127.0.0.1:$JM_PORT" \
    --relayhost "127.0.0.1:$SINK_PORT" --metrics-listen 127.0.0.1:0 \
    --nats-listen "127.0.0.1:$NATS_PORT" --log-format json "$@" >"$work/serve-$name.log" 2>&1 & JM=$!
  wait_port "$JM_PORT" || { echo "bench-large: serve did not listen" >&2; tail -20 "$work/serve-$name.log" >&2; exit 1; }
  MADDR=""
  for _ in $(seq 300); do
    MADDR=$(grep -o '"msg":"metrics listening","addr":"[^"]*"' "$work/serve-$name.log" | head -1 | sed 's/.*"addr":"//; s/"$//' || true)
    [ -n "$MADDR" ] && return 0
    sleep 0.1
  done
  echo "bench-large: no metrics address in the log" >&2; exit 1
}
stop() { kill "$JM"; wait "$JM" 2>/dev/null || true; JM=""; }

# sample PHASE: one line "PHASE seconds rss_kib heap_kib" into samples.
sample() {
  local rss heap
  rss=$(awk '$1 == "VmRSS:" { print $2 }' "/proc/$JM/status" 2>/dev/null || echo 0)
  heap=$(curl -s --max-time 1 "http://$MADDR/metrics" | awk '$1 == "go_memstats_heap_inuse_bytes" { printf "%.0f", $2/1024 }')
  echo "$1 $(date +%s.%N) ${rss:-0} ${heap:-0}" >>"$work/samples"
}
sampler() { while kill -0 "$JM" 2>/dev/null; do sample "$(cat "$work/phase")"; sleep 0.5; done; }
peak() { awk -v p="$1" '$1 == p { if ($3 > r) r = $3; if ($4 > h) h = $4 } END { printf "RSS peak %.0f MiB, heap in use peak %.0f MiB\n", r/1024, h/1024 }' "$work/samples"; }

echo receiving >"$work/phase"
start receive --no-deliver
sampler & SAMPLER=$!
t0=$(date +%s.%N)
smtp-source -s "$COUNT" -l "$SIZE" -m "$COUNT" -c -f a@example.org -t b@example.net "127.0.0.1:$JM_PORT" >"$work/source.out" 2>&1
t1=$(date +%s.%N)
queued=$(curl -s "http://$MADDR/metrics" | awk '$1 ~ /^jetmail_smtp_transactions_total/ && /result="queued"/ { print $2 }')
awk -v a="$t0" -v b="$t1" -v q="${queued:-0}" 'BEGIN { printf "receiving: %d queued in %.1f s; ", q, b - a }'
peak receiving
stop; wait "$SAMPLER" 2>/dev/null || true

"$work/sinkcount" -listen "127.0.0.1:$SINK_PORT" -n "$COUNT" -timeout 600s -linger 1s >"$work/sink.out" 2>&1 & SINK=$!
echo delivering >"$work/phase"
start deliver
sampler & SAMPLER=$!
t0=$(date +%s.%N)
wait "$SINK" || true; SINK=""
t1=$(date +%s.%N)
awk -v a="$t0" -v b="$t1" 'BEGIN { printf "delivering: %.1f s to the last message at the sink; ", b - a }'
peak delivering
grep '^summary' "$work/sink.out" || true
echo after >"$work/phase"
t_after=$(date +%s.%N)
sleep "$AFTER"
stop; wait "$SAMPLER" 2>/dev/null || true
echo "after (seconds since the last message, RSS MiB, heap in use MiB):"
awk -v t="$t_after" '$1 == "after" { s = $2 - t; if (s >= next_at) { printf "  %5.0f s  %6.0f  %6.0f\n", s, $3/1024, $4/1024; next_at += 15 } }' "$work/samples"
