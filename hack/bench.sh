#!/usr/bin/env bash
# Side-by-side acceptance benchmark: jetmail serve (embedded JetStream,
# fsync before every 250) and Postfix, on this machine, in one run, with the
# same smtp-source load: 5 KB messages over 20 concurrent sessions, one
# connection per message. Then the Go benchmark for the final-dot-to-250
# latency (p50, p99) and the JetStream writes per message, and 5,000 idle
# connections against one gateway for its memory.
#
#   hack/bench.sh            # N=20000 messages per run
#   N=50000 hack/bench.sh
#
# Only loopback is used. Needs root for apt-get (Postfix brings smtp-source).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-20000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-5120}
PORT=${PORT:-2527}
work=$(mktemp -d /tmp/bench-jetmail.XXXXXX)
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

if [ ! -x /usr/sbin/smtp-source ]; then
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix >/dev/null
fi

echo "== build"
go build -o "$work/jetmail" ./cmd/jetmail
ulimit -n 65536 2>/dev/null || true

echo "== jetmail serve (fsync before ack, acceptance only: --no-deliver), $N x ${SIZE} B over $SESSIONS sessions"
"$work/jetmail" serve --data-dir "$work/data" --smtp-listen "127.0.0.1:$PORT" \
  --metrics-listen 127.0.0.1:0 --nats-listen "" --log-format json --no-deliver >"$work/serve.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.1
done
/usr/sbin/smtp-source -s "$SESSIONS" -l "$SIZE" -m 1000 -c -f a@example.org -t b@example.net "127.0.0.1:$PORT" >/dev/null
start=$(date +%s.%N)
/usr/sbin/smtp-source -s "$SESSIONS" -l "$SIZE" -m "$N" -c -f a@example.org -t b@example.net "127.0.0.1:$PORT" >/dev/null
end=$(date +%s.%N)
queued=$(grep -c '"result":"queued"' "$work/serve.log" || true)
awk -v n="$N" -v s="$start" -v e="$end" 'BEGIN { printf "jetmail: %d messages in %.2f s = %.0f msg/s\n", n, e-s, n/(e-s) }'
echo "jetmail: $queued transactions logged as queued (warm-up included)"

echo "== 5000 idle connections against the same gateway"
go run ./hack/idleconns -addr "127.0.0.1:$PORT" -n 5000 -pid "$pid"
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""

echo "== Go benchmark: final dot to 250 (one session reuses its connection)"
go test -run '^$' -bench '^BenchmarkAccept$' -benchtime "${N}x" ./smtpgw/ | grep -E '^Benchmark'

echo "== Postfix, same machine, same load"
N="$N" SESSIONS="$SESSIONS" SIZE="$SIZE" hack/bench-postfix.sh | grep -E '^postfix'
