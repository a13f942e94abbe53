#!/usr/bin/env bash
# Throughput and memory baseline: N concurrent SMTP sessions sending 1 KiB
# messages to a local user (Maildir delivery), with postfix's smtp-source as
# the client. Run by hand, not in CI:
#
#   bench/smtp-load.sh [sessions=20] [messages=5000]
#
# Prints messages/second accepted (smtp-source's wall time), the time until
# the queue is empty again, and the peak RSS (VmHWM) of each daemon.
# Needs: apt-get install postfix (for smtp-source); builds tambo in release.
set -euo pipefail
cd "$(dirname "$0")/.."
SESSIONS=${1:-20}
MESSAGES=${2:-5000}
# SENDER= (empty) sends from the null sender, as versus.sh does: no SPF
# lookup, and a MAIL smtpd answers without waiting for queued.
SENDER=${SENDER-sender@remote.example}
# REUSE=1: every session sends its messages over one connection
# (smtp-source -d), as versus.sh's "reused" rows; otherwise one connection
# a message.
REUSE_ARG=${REUSE:+-d}
command -v smtp-source >/dev/null || PATH=$PATH:/usr/sbin
command -v smtp-source >/dev/null || { echo "smtp-source not found: apt-get install postfix" >&2; exit 1; }

# BIN_OVERRIDE: another build's release directory (bench/ab.sh).
DIR=$(mktemp -d "${BENCH_TMP:-/tmp}"/tambo-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT
. bench/lib.sh
BIN=$(tambo_bin)
chmod 755 "$DIR"
mkdir -p "$DIR/config/domains/example.test" "$DIR/logs" "$DIR/mail"
tambo_cert "$DIR/config" bench.example.test
echo 'ann !' > "$DIR/config/domains/example.test/users"
PORT=${PORT:-32525}
# The sender's SPF is looked up on loopback, never in the real DNS.
"$BIN/tambo-test-dns" "remote.example=v=spf1 ip4:127.0.0.0/8 -all" > "$DIR/dns.addr" &
for _ in $(seq 50); do [ -s "$DIR/dns.addr" ] && break; sleep 0.1; done
cat > "$DIR/config/tambo.conf" <<CONF
hostname = "bench.example.test"
smtp_address = ["127.0.0.1:$PORT"]
submission_address = []
submission_over_tls_address = []
data_dir = "$DIR/data"
max_queue_items = 100000
[tambo]
runtime_dir = "$DIR/run"
maildir = "$DIR/mail/%to_domain%/%to_user%"
$TAMBO_USERS
[testing]
dns_server = "$(cat "$DIR/dns.addr")"
CONF

tambo_start "$BIN" "$DIR/config" "$DIR/logs/tambo.log"

start=$(date +%s.%N)
smtp-source $REUSE_ARG -s "$SESSIONS" -m "$MESSAGES" -l 1024 -f "$SENDER" -t ann@example.test "127.0.0.1:$PORT"
accepted=$(date +%s.%N)
# Queued messages: items of their own (m:), or bodies with content (d:;
# the empty ones are ready files, made ahead for new mail).
queued() {
  find "$DIR/data/queue" -maxdepth 1 \( -name 'm:*' -o \( -name 'd:*' -size +0 \) \) -print -quit 2>/dev/null
}
while [ -n "$(queued)" ]; do sleep 0.05; done
drained=$(date +%s.%N)
delivered=$(ls "$DIR/mail/example.test/ann/new" | wc -l)

echo "sessions=$SESSIONS messages=$MESSAGES size=1KiB delivered=$delivered"
awk -v s="$start" -v a="$accepted" -v d="$drained" -v m="$MESSAGES" 'BEGIN {
  printf "accepted: %.1f msg/s (%.2f s)\n", m / (a - s), a - s
  printf "accepted and delivered: %.1f msg/s (%.2f s)\n", m / (d - s), d - s
}'
for p in smtpd queued deliverd monitord; do
  pid=$(pgrep -n -f "tambo-$p --config_dir $DIR/config" || true)
  [ -n "$pid" ] || continue
  cpu=$(awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' /proc/$pid/stat)
  echo "tambo-$p: peak RSS $(awk '/VmHWM/ {print $2, $3}' /proc/$pid/status), CPU ${cpu}s"
done
