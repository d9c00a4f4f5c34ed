#!/usr/bin/env bash
# End-to-end relay benchmark: smtp-source -> MTA -> final destination, for
# jetmail serve (fsync before 250, then --no-sync) and Postfix (fsync before
# 250), on this machine, in one run, with the same load: 5 KB messages over
# 20 concurrent sessions, one connection per message, N=10,000. The final
# destination is hack/sinkcount (a go-smtp server that counts completed DATA
# transactions, tells duplicates apart by Message-Id, and notes the time the
# count reaches N); both MTAs relay to the same sink program, a fresh one per
# run. The rate is N over the time from the first connection (smtp-source
# start) to the N-th message completed at the sink. No warm-up: every run
# starts on a fresh store.
#
# For jetmail it also reads the JetStream counters after the run
# (hack/jscount through the embedded server's --nats-listen): the last
# sequences of JETMAIL_QUEUE, JETMAIL_BODY and KV_JETMAIL_STATE are the
# stream writes of the whole path; consumer deliveries/acks are reported
# apart (they are not stream writes).
#
#   hack/bench-relay.sh            # relay benchmark (N=10000)
#   hack/bench-relay.sh drain      # drain: DRAIN_N=100000 queued while the
#                                  # destination is down, then brought up
#   hack/bench-relay.sh all        # both
#   KEEP=1 hack/bench-relay.sh     # keep the work directory (logs, RSS samples)
#
# Drain: serve runs with --relayhost pointing at a port where nothing listens
# and a DeliveryPolicy with retryIntervals [$RETRY]. DRAIN_N messages are
# injected (fsync on), they wait DRAIN_WAIT seconds while jetmail's RSS is
# sampled every RSS_EVERY seconds, then the sink starts and the drain rate is
# DRAIN_N over the time from sink start to the DRAIN_N-th message at the sink.
# The whole drain is bounded by DRAIN_BUDGET seconds; whatever was seen is
# reported even if it does not finish. DRAIN_FLAGS are added to serve's
# flags (DRAIN_FLAGS=--park-after=-1s: deferred mail waits in the consumer,
# as before parking). INTAKE_N=20000 takes that many messages into the empty
# queue before the DRAIN_N and again after them, and reports both rates.
#
# Only loopback is used. Needs root (Postfix instance; apt-get if missing).
# Keep the machine otherwise idle (no `go test`): the figures are for
# comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH

MODE=${1:-relay}
N=${N:-10000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-5120}
SINK_PORT=${SINK_PORT:-2630}
JM_PORT=${JM_PORT:-2631}
PF_PORT=${PF_PORT:-2632}
NATS_PORT=${NATS_PORT:-4231}
RELAY_TIMEOUT=${RELAY_TIMEOUT:-300}   # seconds, per relay run
DRAIN_N=${DRAIN_N:-100000}
DRAIN_WAIT=${DRAIN_WAIT:-90}          # seconds queued while the destination is down
DRAIN_BUDGET=${DRAIN_BUDGET:-900}     # seconds, whole drain measurement
RETRY=${RETRY:-30s}
RSS_EVERY=${RSS_EVERY:-2}

case "$MODE" in relay|drain|all) ;; *) echo "usage: $0 [relay|drain|all]" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "bench-relay: must run as root (Postfix instance)" >&2; exit 1; }
if [ ! -x /usr/sbin/postfix ] || [ ! -x /usr/sbin/smtp-source ]; then
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix >/dev/null
fi

work=$(mktemp -d /tmp/bench-relay.XXXXXX)
chmod 755 "$work"   # the postfix user must traverse into its queue
SINK="" JM="" SRC="" SAMPLER="" PFMASTER=""

# Stop one process we started: TERM, up to $2 tenths of a second, then KILL.
stop() {
  local p=$1 tries=${2:-100}
  [ -n "$p" ] || return 0
  kill "$p" 2>/dev/null || return 0
  for _ in $(seq "$tries"); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
}
pf_alive() { ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { n++ } END { exit !n }'; }
pf_stop() {
  [ -n "$PFMASTER" ] || return 0
  postfix -c "$work/pf/etc" stop >/dev/null 2>&1 || true
  for _ in $(seq 50); do pf_alive "$PFMASTER" || break; sleep 0.1; done
  pf_alive "$PFMASTER" && kill -9 -- "-$PFMASTER" 2>/dev/null
  PFMASTER=""
}
cleanup() {
  set +e
  stop "$SRC" 10; stop "$SAMPLER" 10; stop "$SINK" 10; stop "$JM" 400
  pf_stop
  if [ -n "${KEEP:-}" ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # port, tenths of a second
  for _ in $(seq "${2:-300}"); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  return 1
}
for p in "$SINK_PORT" "$JM_PORT" "$PF_PORT" "$NATS_PORT"; do
  port_free "$p" || { echo "bench-relay: 127.0.0.1:$p already in use" >&2; exit 1; }
done
now() { date +%s.%N; }
# Print a command as it is run, for the record.
show() { printf '+ %s\n' "$*"; }

echo "== build ($(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- . ':!hack' 2>/dev/null || echo ', with uncommitted changes'))"
go build -o "$work/jetmail" ./cmd/jetmail
go build -o "$work/sinkcount" ./hack/sinkcount
go build -o "$work/jscount" ./hack/jscount
ulimit -n 65536 2>/dev/null || true
echo "host: $(nproc) cores, $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo), /tmp on $(df -T /tmp | awk 'NR==2{print $2" "$1}'), $(go version | awk '{print $3}'), postfix $(postconf -d -h mail_version)"
busy=$(pgrep -af 'go test|\.test( |$)' || true)
[ -z "$busy" ] || printf 'bench-relay: warning: tests are running, figures are not fair:\n%s\n' "$busy" >&2

# start_sink NAME COUNT TIMEOUT_S: a fresh sink in the background ($SINK).
start_sink() {
  local cmd=("$work/sinkcount" -listen "127.0.0.1:$SINK_PORT" -n "$2" -timeout "${3}s" -linger 3s -progress 1s)
  show "${cmd[@]}"
  "${cmd[@]}" >"$work/sink-$1.out" 2>&1 & SINK=$!
  for _ in $(seq 100); do grep -q '^listening' "$work/sink-$1.out" && return 0; sleep 0.1; done
  echo "bench-relay: sink did not start" >&2; cat "$work/sink-$1.out" >&2; exit 1
}
# sink_field NAME KEY: a key=value of the sink's summary line.
sink_field() { awk -v k="$2" '/^summary/ { for (i = 2; i <= NF; i++) { split($i, a, "="); if (a[1] == k) print a[2] } }' "$work/sink-$1.out"; }
sink_reached() { awk '/^reached/ { print $3 }' "$work/sink-$1.out"; }
# wait_sink NAME: wait for the sink to exit (it is bounded by its -timeout).
wait_sink() { local rc=0; wait "$SINK" || rc=$?; SINK=""; return $rc; }
sink_report() { # NAME
  echo "sink: total=$(sink_field "$1" total) distinct=$(sink_field "$1" distinct) duplicates=$(sink_field "$1" duplicates) no_msgid=$(sink_field "$1" no_msgid) smtp_sessions=$(sink_field "$1" sessions)"
}

# source N PORT OUT TIMEOUT_S: the smtp-source load; returns its status.
source_load() {
  local cmd=(smtp-source -s "$SESSIONS" -l "$SIZE" -m "$1" -c -f a@example.org -t b@example.net "127.0.0.1:$2")
  show "${cmd[@]}"
  local rc=0
  timeout "$4" "${cmd[@]}" >"$3" 2>&1 & SRC=$!
  wait "$SRC" || rc=$?
  SRC=""
  if [ "$rc" != 0 ]; then
    echo "bench-relay: smtp-source exited $rc; last output:" >&2
    tail -c 600 "$3" | tr '\r' '\n' | tail -5 >&2
  fi
  return $rc
}

# start_jetmail NAME EXTRA_FLAGS...: jetmail serve in the background ($JM).
start_jetmail() {
  local name=$1; shift
  JM_DATA="$work/data-$name"
  local cmd=("$work/jetmail" serve --data-dir "$JM_DATA" --smtp-listen "127.0.0.1:$JM_PORT"
    --relayhost "127.0.0.1:$SINK_PORT" --metrics-listen 127.0.0.1:0
    --nats-listen "127.0.0.1:$NATS_PORT" --log-format json "$@")
  show "${cmd[@]}"
  "${cmd[@]}" >"$work/serve-$name.log" 2>&1 & JM=$!
  wait_port "$JM_PORT" 300 || { echo "bench-relay: jetmail did not listen" >&2; tail -20 "$work/serve-$name.log" >&2; exit 1; }
}
rss_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || true; }
# jm_metrics NAME: jetmail's own counters from /metrics (its log cannot be
# counted: see jm_log_report).
jm_metrics() {
  local addr
  addr=$(grep -o '"msg":"metrics listening","addr":"[^"]*"' "$work/serve-$1.log" | head -1 | sed 's/.*"addr":"//; s/"$//' || true)
  [ -n "$addr" ] || { echo "  (no metrics address in the log)"; return 0; }
  curl -s --max-time 10 "http://$addr/metrics" |
    grep -E '^jetmail_(smtp_transactions_total|smtp_duplicates_suppressed_total|smtp_deadline_kills_total|delivery_attempts_total|delivery_destination_busy_total|delivery_deadline_kills_total|delivery_expired_total|delivery_notifications_total|delivery_waker_pass_seconds_(count|sum)|queue_messages|nats_received_(bytes|messages)_total)' |
    sed 's/^/  /' || true
}
# jm_log_report NAME: what the log says. The JSON logger is zap's production
# config, which samples (per message text and level: the first 100 in each
# second, then every 100th), so these counts are lower bounds; the figures
# that count are the sink's and /metrics.
jm_log_report() {
  local f=$work/serve-$1.log
  echo "jetmail log lines (sampled by zap, lower bounds): transactions=$(grep -c '"result":"' "$f" || true)" \
    "delivery=$(grep -c '"msg":"delivery"' "$f" || true)" \
    "error=$(grep -c '"level":"error"' "$f" || true)" \
    "warn_not_delivery=$(grep '"level":"warn"' "$f" | grep -v '"msg":"delivery"' | grep -vc 'self-signed certificate' || true)"
  if grep -q '"level":"\(error\|fatal\|panic\|dpanic\)"' "$f"; then
    echo "first error lines:"; grep '"level":"\(error\|fatal\|panic\|dpanic\)"' "$f" | head -5
  fi
  if grep -v '"msg":"delivery"' "$f" | grep -v 'self-signed certificate' | grep -q '"level":"warn"'; then
    echo "first warn lines (not delivery):"; grep '"level":"warn"' "$f" | grep -v '"msg":"delivery"' | grep -v 'self-signed certificate' | head -5
  fi
}

relay_jetmail() { # NAME LABEL EXTRA_FLAGS...
  local name=$1 label=$2; shift 2
  echo
  echo "== jetmail serve $label: $N x $SIZE B over $SESSIONS sessions, relayed to the sink"
  start_sink "$name" "$N" "$RELAY_TIMEOUT"
  start_jetmail "$name" "$@"
  local t0 t1 src_rc=0 sink_rc=0
  t0=$(now)
  source_load "$N" "$JM_PORT" "$work/source-$name.out" "$RELAY_TIMEOUT" || src_rc=$?
  t1=$(now)
  wait_sink || sink_rc=$?
  local reached; reached=$(sink_reached "$name")
  awk -v n="$N" -v a="$t0" -v b="$t1" 'BEGIN { printf "acceptance (smtp-source start to exit): %.2f s = %.0f msg/s\n", b-a, n/(b-a) }'
  if [ -n "$reached" ]; then
    awk -v n="$N" -v a="$t0" -v r="$reached" -v l="$label" \
      'BEGIN { s = r/1e9 - a; printf "jetmail relay: %d msgs in %.2f s = %.0f msg/s (%s)\n", n, s, n/s, l }'
  else
    echo "jetmail relay: DID NOT FINISH ($label): sink counted $(sink_field "$name" total) of $N in ${RELAY_TIMEOUT}s (smtp-source rc=$src_rc, sink rc=$sink_rc)"
  fi
  sink_report "$name"
  echo "jetmail RSS: $(rss_kib "$JM" VmRSS) KiB now, peak $(rss_kib "$JM" VmHWM) KiB"
  show "$work/jscount" -nkey "$JM_DATA/nats-user.nk" -url "nats://127.0.0.1:$NATS_PORT" -n "$N" -wait 30s
  "$work/jscount" -nkey "$JM_DATA/nats-user.nk" -url "nats://127.0.0.1:$NATS_PORT" -n "$N" -wait 30s | sed 's/^/  /' || echo "jscount failed"
  echo "jetmail /metrics:"; jm_metrics "$name"
  stop "$JM" 400; JM=""
  jm_log_report "$name"
}

relay_postfix() {
  echo
  echo "== Postfix $(postconf -d -h mail_version): $N x $SIZE B over $SESSIONS sessions, relayed to the sink"
  local P=$work/pf CONF=$work/pf/etc Q=$work/pf/queue DATA=$work/pf/data LOG=$work/pf/maillog
  mkdir -p "$CONF" "$Q" "$DATA"; chmod 755 "$P"
  chown postfix "$DATA" && chmod 700 "$DATA"
  cp /usr/share/postfix/master.cf.dist "$CONF/master.cf" 2>/dev/null || cp /etc/postfix/master.cf.proto "$CONF/master.cf"
  : >"$CONF/main.cf"
  pc() { postconf -c "$CONF" "$@"; }
  # As hack/bench-postfix.sh, but mail really leaves through smtp(8) to the
  # sink: relayhost, default_transport=smtp. fsync before 250 is the default.
  pc -e \
    "queue_directory=$Q" "data_directory=$DATA" "maillog_file=$LOG" "maillog_file_prefixes=$work" \
    compatibility_level=3.6 myhostname=bench.localdomain mydestination= \
    inet_interfaces=127.0.0.1 inet_protocols=ipv4 mynetworks=127.0.0.0/8 \
    "relayhost=[127.0.0.1]:$SINK_PORT" default_transport=smtp relay_transport=smtp local_transport=discard \
    default_process_limit=100 smtpd_client_connection_rate_limit=0 \
    alias_maps= alias_database=
  pc -MX smtp/inet
  pc -M "127.0.0.1:$PF_PORT/inet=127.0.0.1:$PF_PORT inet n - n - - smtpd"
  pc -F '*/*/chroot=n'
  echo "postfix main.cf:"; sed 's/^/  /' "$CONF/main.cf"

  start_sink postfix "$N" "$RELAY_TIMEOUT"
  show postfix -c "$CONF" start
  postfix -c "$CONF" start >"$P/start.out" 2>&1 || { cat "$P/start.out" "$LOG" >&2 || true; exit 1; }
  PFMASTER=$(awk '{print $1; exit}' "$Q/pid/master.pid")
  wait_port "$PF_PORT" 100 || { echo "bench-relay: postfix did not listen" >&2; exit 1; }
  sleep 0.5   # the probe above is one harmless "lost connection after CONNECT"

  local t0 t1 src_rc=0 sink_rc=0
  t0=$(now)
  source_load "$N" "$PF_PORT" "$work/source-postfix.out" "$RELAY_TIMEOUT" || src_rc=$?
  t1=$(now)
  wait_sink || sink_rc=$?
  local reached; reached=$(sink_reached postfix)
  awk -v n="$N" -v a="$t0" -v b="$t1" 'BEGIN { printf "acceptance (smtp-source start to exit): %.2f s = %.0f msg/s\n", b-a, n/(b-a) }'
  if [ -n "$reached" ]; then
    awk -v n="$N" -v a="$t0" -v r="$reached" \
      'BEGIN { s = r/1e9 - a; printf "postfix relay: %d msgs in %.2f s = %.0f msg/s (fsync)\n", n, s, n/s }'
  else
    echo "postfix relay: DID NOT FINISH: sink counted $(sink_field postfix total) of $N in ${RELAY_TIMEOUT}s (smtp-source rc=$src_rc, sink rc=$sink_rc)"
  fi
  sink_report postfix
  sleep 1
  local left; left=$(find "$Q"/maildrop "$Q"/incoming "$Q"/active "$Q"/deferred -type f 2>/dev/null | wc -l)
  echo "postfix log: sent=$(grep -c 'postfix/smtp\[.*status=sent' "$LOG" || true)" \
    "deferred=$(grep -c 'status=deferred' "$LOG" || true) bounced=$(grep -c 'status=bounced' "$LOG" || true)" \
    "rejects=$(grep -c 'reject' "$LOG" || true) left_in_queue=$left"
  pf_stop
}

drain() {
  echo
  echo "== drain: $DRAIN_N x $SIZE B queued while the destination is down, then brought up (budget ${DRAIN_BUDGET}s)"
  local t_begin deadline
  t_begin=$(date +%s); deadline=$((t_begin + DRAIN_BUDGET))
  left() { local l=$((deadline - $(date +%s))); [ "$l" -gt 1 ] && echo "$l" || echo 1; }
  cat >"$work/policy.yaml" <<EOF
apiVersion: mail.jetmail.io/v1alpha1
kind: DeliveryPolicy
metadata:
  name: bench
  namespace: mail
spec:
  retryIntervals: [$RETRY]
EOF
  echo "policy ($work/policy.yaml):"; sed 's/^/  /' "$work/policy.yaml"
  port_free "$SINK_PORT" || { echo "bench-relay: something listens on $SINK_PORT" >&2; exit 1; }
  # shellcheck disable=SC2086 # DRAIN_FLAGS: several serve flags, split
  start_jetmail drain -f "$work/policy.yaml" ${DRAIN_FLAGS:-}
  echo inject >"$work/phase"
  # RSS sampler, bounded in count (and by jetmail's life); with the Go heap
  # in use and the goroutine count from /metrics, to tell live memory from
  # memory the runtime has not returned.
  local maddr=""
  for _ in $(seq 100); do
    maddr=$(grep -o '"msg":"metrics listening","addr":"[^"]*"' "$work/serve-drain.log" | head -1 | sed 's/.*"addr":"//; s/"$//' || true)
    [ -n "$maddr" ] && break; sleep 0.1
  done
  (
    for _ in $(seq $((DRAIN_BUDGET / RSS_EVERY + 10))); do
      r=$(rss_kib "$JM" VmRSS); [ -n "$r" ] || break
      m=$(curl -s --max-time 2 "http://$maddr/metrics" | awk '$1 == "go_memstats_heap_inuse_bytes" { h = $2 } $1 == "go_goroutines" { g = $2 } END { printf "%.0f %d", h/1024, g }')
      echo "$(date +%s.%N) $(cat "$work/phase") $r $m"
      sleep "$RSS_EVERY"
    done
  ) >"$work/rss.txt" 2>/dev/null & SAMPLER=$!

  local t0 t1 src_rc=0 queued
  queued_now() { local q; q=$(jm_metrics drain | awk '$1 == "jetmail_smtp_transactions_total{result=\"queued\"}" { printf "%d", $2 }'); echo "${q:-0}"; }
  # inject N LABEL: one smtp-source batch, its acceptance rate reported.
  inject() {
    local before after a b rc=0
    before=$(queued_now); a=$(now)
    source_load "$1" "$JM_PORT" "$work/source-$2.out" "$(left)" || rc=$?
    b=$(now); after=$(queued_now)
    awk -v n="$((after - before))" -v q="$after" -v a="$a" -v b="$b" -v rc="$rc" -v l="$2" \
      'BEGIN { printf "injection (%s): %d messages queued in %.2f s = %.0f msg/s, %d in the queue now (fsync on; smtp-source rc=%s)\n", l, n, b-a, n/(b-a), q, rc }'
    [ "$rc" = 0 ]
  }
  # With INTAKE_N, the same batch is taken into the empty queue first and
  # into the full one last: the intake with DRAIN_N queued against the
  # intake of an empty queue, in one run.
  if [ "${INTAKE_N:-0}" -gt 0 ]; then inject "$INTAKE_N" intake-empty || src_rc=$?; fi
  t0=$(now)
  inject "$DRAIN_N" bulk || src_rc=$?
  t1=$(now)
  if [ "${INTAKE_N:-0}" -gt 0 ]; then inject "$INTAKE_N" intake-full || src_rc=$?; fi
  queued=$(queued_now)
  awk -v n="$queued" -v a="$t0" -v b="$t1" -v rc="$src_rc" \
    'BEGIN { printf "injection: %d messages queued in all; the bulk batch took %.2f s (smtp-source rc=%s)\n", n, b-a, rc }'
  echo "after injection:"; "$work/jscount" -nkey "$JM_DATA/nats-user.nk" -url "nats://127.0.0.1:$NATS_PORT" | sed 's/^/  /' || true; jm_metrics drain

  echo wait >"$work/phase"
  local w=$DRAIN_WAIT; [ "$w" -lt "$(left)" ] || w=$(( $(left) / 2 ))
  echo "waiting ${w}s with the destination down"
  local rx0 rx1
  rx0=$(jm_metrics drain | awk '$1 == "jetmail_nats_received_bytes_total" { b = $2 } $1 == "jetmail_nats_received_messages_total" { m = $2 } END { printf "%.0f %.0f", b, m }')
  sleep "$w"
  rx1=$(jm_metrics drain | awk '$1 == "jetmail_nats_received_bytes_total" { b = $2 } $1 == "jetmail_nats_received_messages_total" { m = $2 } END { printf "%.0f %.0f", b, m }')
  echo "after the wait:"; "$work/jscount" -nkey "$JM_DATA/nats-user.nk" -url "nats://127.0.0.1:$NATS_PORT" | sed 's/^/  /' || true; jm_metrics drain
  # Everything jetmail read from JetStream during the wait arrived on its
  # NATS connection (jscount has its own): the read figure of issue 11.
  echo "$rx0 $rx1" | awk -v n="$queued" -v w="$w" -v r="$RETRY" '{ rs = r + 0; if (r ~ /m$/) rs *= 60
    printf "reads during the wait: %.0f bytes in %.0f NATS messages over %d s; %.2f bytes per queued message per retry interval (%s)\n", $3-$1, $4-$2, w, ($3-$1)/n/(w/rs), r }'

  echo drain >"$work/phase"
  local t_up sink_rc=0
  [ "$queued" -gt 0 ] || queued=1
  t_up=$(now)   # the destination comes up: the sink process starts
  start_sink drain "$queued" "$(left)"
  wait_sink || sink_rc=$?
  echo after >"$work/phase"
  local reached first; reached=$(sink_reached drain); first=$(sink_field drain first)
  if [ -n "$reached" ]; then
    awk -v n="$queued" -v a="$t_up" -v r="$reached" -v f="$first" \
      'BEGIN { s = r/1e9 - a; printf "jetmail drain: %d msgs in %.2f s = %.0f msg/s (sink start to last message; first message %.2f s after sink start; %.0f msg/s first to last)\n", n, s, n/s, f/1e9 - a, n/(r/1e9 - f/1e9) }'
  else
    local got; got=$(sink_field drain total)
    awk -v n="$queued" -v g="$got" -v a="$t_up" -v l="$(sink_field drain last)" \
      'BEGIN { s = l/1e9 - a; printf "jetmail drain: DID NOT FINISH within the budget: sink counted %d of %d (%.0f msg/s while it ran)\n", g, n, (s > 0 ? g/s : 0) }'
  fi
  sink_report drain
  echo "sink progress (count every ~10 s from sink start):"
  awk -v a="$t_up" '/^progress/ { t = $2/1e9 - a; if (t >= next_t) { printf "  %6.1f s %7d\n", t, $3; next_t = t + 10 } last = $0 }
    END { split(last, x, " "); printf "  %6.1f s %7d (last)\n", x[2]/1e9 - a, x[3] }' "$work/sink-drain.out"
  sleep "$RSS_EVERY"
  echo "jetmail memory by phase (VmRSS; Go heap in use; goroutines; sampled every ${RSS_EVERY}s):"
  awk '{ p = $2; r = $3/1024; h = $4/1024; n[p]++; if (!(p in mn) || r < mn[p]) mn[p] = r; if (r > mx[p]) mx[p] = r; last[p] = r; if (!(p in fst)) fst[p] = r
         if (!(p in hmn) || h < hmn[p]) hmn[p] = h; if (h > hmx[p]) hmx[p] = h; if ($5 > gmx[p]) gmx[p] = $5 }
    END { split("inject wait drain after", o, " "); for (i = 1; i <= 4; i++) { p = o[i]; if (p in n)
      printf "  %-7s samples=%3d RSS first=%7.1f min=%7.1f max=%7.1f last=%7.1f MiB; heap in use min=%7.1f max=%7.1f MiB; goroutines max=%d\n", p, n[p], fst[p], mn[p], mx[p], last[p], hmn[p], hmx[p], gmx[p] } }' "$work/rss.txt"
  echo "memory every ~20 s (s since serve start, phase, RSS MiB, heap in use MiB, goroutines):"
  awk 'NR == 1 { a = $1 } $1 - a >= next_t { printf "  %5.0f %-6s %7.1f %7.1f %6d\n", $1 - a, $2, $3/1024, $4/1024, $5; next_t = $1 - a + 20 }' "$work/rss.txt"
  echo "jetmail RSS peak (VmHWM): $(rss_kib "$JM" VmHWM) KiB"
  "$work/jscount" -nkey "$JM_DATA/nats-user.nk" -url "nats://127.0.0.1:$NATS_PORT" -n "$queued" -wait 30s | sed 's/^/  /' || true
  echo "jetmail /metrics:"; jm_metrics drain
  stop "$SAMPLER" 10; SAMPLER=""
  stop "$JM" 400; JM=""
  jm_log_report drain
  echo "drain total wall time: $(( $(date +%s) - t_begin )) s"
}

if [ "$MODE" = relay ] || [ "$MODE" = all ]; then
  relay_jetmail fsync fsync
  relay_jetmail nosync "no fsync" --no-sync
  relay_postfix
fi
if [ "$MODE" = drain ] || [ "$MODE" = all ]; then
  drain
fi
