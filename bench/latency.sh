#!/usr/bin/env bash
# Where one message's time goes, seen from the client: one session sends N
# messages of 1 KiB, null sender, to a local user (Maildir), and
# bench/latency.py prints the median and 90th percentile of each step's
# wait (MAIL, RCPT, DATA, the end of the data). Run by hand, not in CI:
#
#   bench/latency.sh [messages=3000]
#
# BIN_OVERRIDE: another build's release directory, as for smtp-load.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES=${1:-3000}
DIR=$(mktemp -d "${BENCH_TMP:-/tmp}"/tambo-latency.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT
. bench/lib.sh
BIN=$(tambo_bin)
chmod 755 "$DIR"
mkdir -p "$DIR/config/domains/example.test" "$DIR/logs" "$DIR/mail"
tambo_cert "$DIR/config" bench.example.test
echo 'ann !' > "$DIR/config/domains/example.test/users"
PORT=${PORT:-32600}
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
CONF
tambo_start "$BIN" "$DIR/config" "$DIR/logs/tambo.log"
python3 bench/latency.py "$PORT" "$MESSAGES"
