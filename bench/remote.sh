#!/usr/bin/env bash
# Remote delivery throughput: tambo A relays N messages of 1 KiB to tambo B
# over SMTP on loopback, with and without connection reuse. Run by hand:
#
#   bench/remote.sh [messages=2000] [sessions=20]
#
# postfix's smtp-source puts the messages into A (to an alias that
# forwards to ann@b.test via 127.0.0.1, so no DNS is involved); the clock
# runs from the first message accepted by A until the last one is in B's
# Maildir. Prints messages/second end to end and the SMTP connections A
# opened (tambo/smtpOut/connections), for smtp_connection_cache_time = 2s
# (the default: reuse) and 0s (one connection per delivery).
# Needs: apt-get install postfix (smtp-source); builds tambo in release.
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES=${1:-2000}
SESSIONS=${2:-20}
command -v smtp-source >/dev/null || PATH=$PATH:/usr/sbin
command -v smtp-source >/dev/null || { echo "smtp-source not found: apt-get install postfix" >&2; exit 1; }

cargo build --release --workspace --locked 2>&1 | tail -1
BIN=$PWD/target/release
ROOT=$(mktemp -d "${BENCH_TMP:-/tmp}"/tambo-bench-remote.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$ROOT"' EXIT
. bench/lib.sh
chmod 755 "$ROOT"
A_PORT=${A_PORT:-32625}
B_PORT=${B_PORT:-32626}
A_HTTP=${A_HTTP:-32627}

# setup NAME DOMAIN PORT CACHE_TIME [extra top-level lines]
setup() {
  local dir=$ROOT/$1
  mkdir -p "$dir/config/domains/$2" "$dir/logs"
  tambo_cert "$dir/config" "mx.$2"
  cat > "$dir/config/tambo.conf" <<CONF
hostname = "mx.$2"
smtp_address = ["127.0.0.1:$3"]
submission_address = []
submission_over_tls_address = []
data_dir = "$dir/data"
max_queue_items = 100000
${5:-}
[tambo]
runtime_dir = "$dir/run"
maildir = "$dir/mail/%to_domain%/%to_user%"
smtp_connection_cache_time = "$4"
$TAMBO_USERS
[testing]
smtp_port = $B_PORT
CONF
}

start() {
  tambo_start "$BIN" "$ROOT/$1/config" "$ROOT/$1/logs/tambo.log"
}

connections() {
  curl -s "http://127.0.0.1:$A_HTTP/debug/vars" |
    python3 -c 'import json,sys; print(json.load(sys.stdin).get("tambo/smtpOut/connections", 0))'
}

run() {
  local cache=$1
  rm -rf "${ROOT:?}"/a "${ROOT:?}"/b
  setup a a.test "$A_PORT" "$cache" "monitoring_address = \"127.0.0.1:$A_HTTP\""
  echo 'fwd: ann@b.test via 127.0.0.1' > "$ROOT/a/config/domains/a.test/aliases"
  setup b b.test "$B_PORT" "$cache"
  echo 'ann !' > "$ROOT/b/config/domains/b.test/users"
  start b
  start a
  local inbox=$ROOT/b/mail/b.test/ann/new
  local t0 t1 n=0
  t0=$(date +%s.%N)
  smtp-source -s "$SESSIONS" -m "$MESSAGES" -l 1024 -f sender@a.test -t fwd@a.test "127.0.0.1:$A_PORT"
  while [ "$n" -lt "$MESSAGES" ]; do
    n=$(find "$inbox" -type f 2>/dev/null | wc -l)
    sleep 0.05
  done
  t1=$(date +%s.%N)
  local conns
  # Counters reach monitord every half second: let the last ones arrive.
  sleep 1.5
  conns=$(connections)
  awk -v a="$t0" -v b="$t1" -v m="$MESSAGES" -v c="$cache" -v n="$conns" 'BEGIN {
    printf "smtp_connection_cache_time=%s: %d messages A→B in %.2f s: %.1f msg/s, %d connections opened\n", c, m, b - a, m / (b - a), n
  }'
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
}

run 2s
run 0s
