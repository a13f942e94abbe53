#!/usr/bin/env bash
# Memory per idle SMTP connection after EHLO, summed over every process of
# the server (PSS from /proc/<pid>/smaps_rollup), for tambo and, when it is
# installed, Debian's chasquid, in one run. Run by hand, not in CI:
#
#   bench/idle-memory.sh [connections=1000]
#
# For each server: start it in a temp dir, warm it up with one connection,
# measure the PSS of its processes, open N connections that each say EHLO
# and then idle (bench/idle_conns.py), measure again, and print the
# difference per connection.
# Needs: python3; for the comparison, apt-get install chasquid openssl.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}
cargo build --release --workspace --locked 2>&1 | tail -1
BIN=$PWD/target/release
ROOT=$(mktemp -d "${BENCH_TMP:-/tmp}"/tambo-idle.XXXXXX)
chmod 755 "$ROOT"
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$ROOT"' EXIT
ulimit -n "$(ulimit -Hn)"
. bench/lib.sh

# measure NAME PORT PGREP-PATTERN
measure() {
  local name=$1 port=$2 pattern=$3 pids before after line
  python3 bench/idle_conns.py 127.0.0.1 "$port" 1 </dev/null >/dev/null
  sleep 1
  pids=$(pgrep -f "$pattern" | tr '\n' ' ')
  before=$(pss $pids)
  coproc CLIENT { python3 bench/idle_conns.py 127.0.0.1 "$port" "$N"; }
  read -r line <&"${CLIENT[0]}"
  [ "$line" = ready ] || { echo "$name: client failed: $line" >&2; exit 1; }
  sleep 2
  after=$(pss $pids)
  kill "$CLIENT_PID" 2>/dev/null || true
  wait "$CLIENT_PID" 2>/dev/null || true
  awk -v n="$name" -v b="$before" -v a="$after" -v c="$N" 'BEGIN {
    printf "%-9s PSS %6d KiB idle, %6d KiB with %d connections: %.1f KiB per idle connection after EHLO\n", n, b, a, c, (a - b) / c }'
}

tambo_run() {
  local port=32526 dir="$ROOT/tambo"
  mkdir -p "$dir/config/domains/example.test"
  echo 'ann !' > "$dir/config/domains/example.test/users"
  tambo_cert "$dir/config" bench.example.test
  cat > "$dir/config/tambo.conf" <<CONF
hostname = "bench.example.test"
smtp_address = ["127.0.0.1:$port"]
submission_address = []
submission_over_tls_address = []
data_dir = "$dir/data"
[tambo]
runtime_dir = "$dir/run"
maildir = "$dir/mail/%to_domain%/%to_user%"
# All the connections come from one address.
max_sessions = $((N + 100))
max_sessions_per_client = $((N + 100))
$TAMBO_USERS
CONF
  "$BIN/tambo" run --config_dir "$dir/config" 2>"$dir/log" &
  until grep -q "smtpd listening" "$dir/log" && grep -q "connected to queued" "$dir/log"; do sleep 0.05; done
  measure tambo "$port" "tambo-.* --config_dir $dir/config"
  kill %% 2>/dev/null; wait %% 2>/dev/null || true
}

chasquid_run() {
  local port=32536 dir="$ROOT/chasquid"
  mkdir -p "$dir/config/domains/example.test" "$dir/config/certs/bench"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=bench.example.test \
    -keyout "$dir/config/certs/bench/privkey.pem" -out "$dir/config/certs/bench/fullchain.pem" 2>/dev/null
  cat > "$dir/config/chasquid.conf" <<CONF
hostname: "bench.example.test"
smtp_address: "127.0.0.1:$port"
submission_address: "127.0.0.1:$((port + 1))"
submission_over_tls_address: "127.0.0.1:$((port + 2))"
data_dir: "$dir/data"
mail_log_path: "$dir/mail.log"
CONF
  chasquid -config_dir "$dir/config" 2>"$dir/log" &
  until nc -z 127.0.0.1 "$port" 2>/dev/null; do sleep 0.1; done
  measure chasquid "$port" "chasquid -config_dir $dir/config"
  kill %% 2>/dev/null; wait %% 2>/dev/null || true
}

tambo_run
if command -v chasquid >/dev/null && command -v openssl >/dev/null && command -v nc >/dev/null; then
  systemctl stop chasquid 2>/dev/null || true
  chasquid_run
else
  echo "chasquid, openssl or nc not found: apt-get install chasquid openssl netcat-openbsd for the comparison" >&2
fi
