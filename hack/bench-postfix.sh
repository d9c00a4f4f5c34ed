#!/usr/bin/env bash
# bench-postfix.sh - measure Postfix SMTP acceptance throughput on this host,
# as a baseline for jetmail ("messages accepted per second").
#
# Starts a throwaway Postfix instance (private config_directory, queue_directory
# and data_directory under a temp dir, started with `postfix -c DIR start`),
# listening only on 127.0.0.1:$PORT, then drives it with smtp-source.
#
# Delivery choice: default_transport/relay_transport/local_transport = discard.
# Every accepted message is still written to the queue and fsync'ed by cleanup(8)
# before the 250 reply (Postfix default), then qmgr hands it to discard(8), which
# marks it delivered and removes the queue file. Nothing ever leaves the box.
# We time acceptance only (smtp-source start -> last 250), but qmgr/discard run
# concurrently, as they would on a real server.
#
# Env: PORT (2526) N (20000) WARMUP (1000) SESSIONS (20) SIZE (5120 bytes) RUNS (1)
set -euo pipefail

PORT=${PORT:-2526}
N=${N:-20000}
WARMUP=${WARMUP:-1000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-5120}
RUNS=${RUNS:-1}
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH

[ "$(id -u)" = 0 ] || { echo "bench-postfix: must run as root" >&2; exit 1; }

# 1. Install Postfix (Debian ships smtp-source/smtp-sink in the postfix package).
if [ ! -x /usr/sbin/postfix ]; then
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix >/dev/null
fi
command -v smtp-source >/dev/null || { echo "bench-postfix: smtp-source not found" >&2; exit 1; }

# Refuse to run if something (e.g. a leftover instance) already owns the port.
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
  echo "bench-postfix: 127.0.0.1:$PORT already in use" >&2; exit 1
fi

# 2. Private instance layout. Everything lives in $WORK; nothing in /etc/postfix changes.
WORK=$(mktemp -d /tmp/bench-postfix.XXXXXX)
chmod 755 "$WORK"                      # postfix user must traverse into the queue
CONF=$WORK/etc Q=$WORK/queue DATA=$WORK/data LOG=$WORK/maillog
mkdir -p "$CONF" "$Q" "$DATA"
chown postfix "$DATA" && chmod 700 "$DATA"   # master.lock etc. are created as postfix

# 4. Cleanup: stop the instance, make sure its process group (master + children,
# master does setsid) is gone, drop $WORK. Zombies awaiting init's reap don't count.
alive() { ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { n++ } END { exit !n }'; }
SRC=
cleanup() {
  set +e
  [ -n "$SRC" ] && kill "$SRC" 2>/dev/null && wait "$SRC" 2>/dev/null
  if [ -s "$Q/pid/master.pid" ]; then
    local mpid; mpid=$(awk '{print $1; exit}' "$Q/pid/master.pid")
    postfix -c "$CONF" stop >/dev/null 2>&1
    for _ in $(seq 50); do alive "$mpid" || break; sleep 0.1; done
    alive "$mpid" && kill -9 -- "-$mpid" 2>/dev/null
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cp /usr/share/postfix/master.cf.dist "$CONF/master.cf" 2>/dev/null || cp /etc/postfix/master.cf.proto "$CONF/master.cf"
: >"$CONF/main.cf"
pc() { postconf -c "$CONF" "$@"; }
pc -e \
  "queue_directory=$Q" "data_directory=$DATA" "maillog_file=$LOG" "maillog_file_prefixes=$WORK" \
  compatibility_level=3.6 myhostname=bench.localdomain mydestination= \
  inet_interfaces=127.0.0.1 inet_protocols=ipv4 mynetworks=127.0.0.0/8 \
  default_transport=discard relay_transport=discard local_transport=discard \
  default_process_limit=100 smtpd_client_connection_rate_limit=0 \
  alias_maps= alias_database=   # Debian's hash:/etc/aliases,nis:... only spam errors here
# (Relay for mynetworks comes from the default smtpd_relay_restrictions =
#  permit_mynetworks, ..., defer_unauth_destination.)
# master.cf: replace the port-25 listener with 127.0.0.1:$PORT; no chroot, so the
# instance needs no copies of /etc files inside its queue directory.
pc -MX smtp/inet
pc -M "127.0.0.1:$PORT/inet=127.0.0.1:$PORT inet n - n - - smtpd"
pc -F '*/*/chroot=n'

# Non-tty postfix(1) errors go only to the log file, so show it on failure.
postfix -c "$CONF" start >"$WORK/start.out" 2>&1 || { cat "$WORK/start.out" "$LOG" >&2 || true; exit 1; }
# Wait for the listener (this probe logs one harmless "lost connection after CONNECT").
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done

echo "postfix $(postconf -d -h mail_version), $(nproc) cores, queue on $(df -T "$Q" | awk 'NR==2{print $2" "$1}')"

# Files still in the queue (maildrop/incoming/active/deferred).
queued() { find "$Q"/maildrop "$Q"/incoming "$Q"/active "$Q"/deferred -type f 2>/dev/null | wc -l; }
drain() { for _ in $(seq 600); do [ "$(queued)" -eq 0 ] && return; sleep 0.1; done
          echo "bench-postfix: warning: queue not empty ($(queued) files)" >&2; }

# 3. Load. smtp-source opens a new connection per message (no -d), aborts on any
# non-2xx reply (no -A), and exits non-zero, which set -e turns into a failure.
load() { # $1 = message count, $2 = label
  local t0 t1
  t0=$(date +%s.%N)
  # Background + wait, so a TERM/INT to this script runs the trap immediately.
  smtp-source -s "$SESSIONS" -l "$SIZE" -m "$1" -c -f a@example.org -t b@example.net \
    "127.0.0.1:$PORT" >"$WORK/source.out" 2>&1 & SRC=$!
  wait "$SRC" || { tail -c 2000 "$WORK/source.out" >&2; exit 1; }
  SRC=
  t1=$(date +%s.%N)
  awk -v n="$1" -v a="$t0" -v b="$t1" -v l="$2" \
    'BEGIN { s = b - a; printf "%s: %d messages in %.2f s = %.0f msg/s\n", l, n, s, n / s }'
}

if [ "$WARMUP" -gt 0 ]; then load "$WARMUP" "warm-up"; drain; fi
for _ in $(seq "$RUNS"); do load "$N" "postfix"; drain; done

# Sanity check from the instance's own log: everything accepted was discarded.
sleep 0.5
want=$((WARMUP + N * RUNS))
got=$(grep -c 'postfix/discard.*status=sent' "$LOG" || true)
rej=$(grep -cE 'reject|status=(deferred|bounced)' "$LOG" || true)
echo "check: expected $want, discarded $got, rejected/deferred/bounced $rej, left in queue $(queued)"
