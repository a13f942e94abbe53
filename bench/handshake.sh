#!/usr/bin/env bash
# What keeping the TLS keys in queued costs. Run by hand, not in CI:
#
#   bench/handshake.sh [seconds-per-round=10] [rounds=3] [idle-connections=1000]
#
# 1. Full TLS 1.3 handshakes per second on an implicit-TLS port (465 style),
#    for an ECDSA P-256 and an RSA-2048 certificate, against: tambo (smtpd,
#    every signature made by queued over the key link); the same rustls
#    server configuration with the key in process (tambo-bench-tls serve);
#    and, when installed, Debian's chasquid (Go, key in process). The
#    servers take turns, round after round, with the same client
#    (tambo-bench-tls load: 8 connections at once, no resumption); ratios
#    are within a round. tambo runs with max_tls_signatures_per_second
#    raised out of the way: its default, 1000, caps handshakes at that rate.
# 2. Peak RSS (VmHWM) of smtpd and queued, and PSS of every tambo process,
#    with N idle TLS sessions that each said EHLO (bench/idle_conns.py
#    --tls); chasquid's for comparison.
# Needs: openssl, python3; chasquid and nc for the comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
ROUNDS=${2:-3}
N=${3:-1000}
cargo build --release --workspace --locked 2>&1 | tail -1
BIN=$PWD/target/release
ROOT=$(mktemp -d "${BENCH_TMP:-/tmp}"/tambo-handshake.XXXXXX)
chmod 755 "$ROOT"
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$ROOT"' EXIT
ulimit -n "$(ulimit -Hn)"
. bench/lib.sh
HAVE_CHASQUID=0
if command -v chasquid >/dev/null && command -v nc >/dev/null; then
  HAVE_CHASQUID=1
  systemctl stop chasquid 2>/dev/null || true
else
  echo "chasquid or nc not found: apt-get install chasquid netcat-openbsd for the comparison" >&2
fi

# cert DIR ecdsa|rsa
cert() {
  mkdir -p "$1"
  local alg=(-newkey ec -pkeyopt ec_paramgen_curve:P-256)
  [ "$2" = rsa ] && alg=(-newkey rsa:2048)
  openssl req -x509 "${alg[@]}" -nodes -days 2 -subj /CN=bench.example.test \
    -addext subjectAltName=DNS:bench.example.test \
    -keyout "$1/privkey.pem" -out "$1/fullchain.pem" 2>/dev/null
}

# tambo_start DIR PORT CERTDIR: tambo with only port PORT (implicit TLS).
tambo_start() {
  local dir=$1 port=$2
  mkdir -p "$dir/config/domains/example.test" "$dir/config/certs"
  echo 'ann !' > "$dir/config/domains/example.test/users"
  cp -r "$3" "$dir/config/certs/bench"
  cat > "$dir/config/tambo.conf" <<CONF
hostname = "bench.example.test"
smtp_address = []
submission_address = []
submission_over_tls_address = ["127.0.0.1:$port"]
data_dir = "$dir/data"
[tambo]
runtime_dir = "$dir/run"
maildir = "$dir/mail/%to_domain%/%to_user%"
# All the connections come from one address.
max_sessions = $((N + 100))
max_sessions_per_client = $((N + 100))
# The default budget (1000 a second) would be what is measured.
max_tls_signatures_per_second = 1000000
$TAMBO_USERS
CONF
  "$BIN/tambo" run --config_dir "$dir/config" 2>"$dir/log" &
  local pid=$!
  until grep -q "TLS ready with" "$dir/log"; do
    kill -0 $pid 2>/dev/null || { echo "tambo did not start:" >&2; tail -3 "$dir/log" >&2; exit 1; }
    sleep 0.05
  done
}

# chasquid_start DIR PORT CERTDIR: chasquid; PORT is its 465.
chasquid_start() {
  local dir=$1 port=$2
  mkdir -p "$dir/config/domains/example.test" "$dir/config/certs"
  cp -r "$3" "$dir/config/certs/bench"
  cat > "$dir/config/chasquid.conf" <<CONF
hostname: "bench.example.test"
smtp_address: "127.0.0.1:$((port + 1))"
submission_address: "127.0.0.1:$((port + 2))"
submission_over_tls_address: "127.0.0.1:$port"
data_dir: "$dir/data"
mail_log_path: "$dir/mail.log"
CONF
  chasquid -config_dir "$dir/config" 2>"$dir/log" &
  until nc -z 127.0.0.1 "$port" 2>/dev/null; do sleep 0.1; done
}

rate() { "$BIN/tambo-bench-tls" load "127.0.0.1:$1" --seconds "$SECS" | awk '{print $1}'; }

echo "== full TLS 1.3 handshakes per second on an implicit-TLS port ($SECS s per turn, $ROUNDS rounds)"
# Below the ephemeral range (32768 and up), which the client's connections use.
port=24000
for alg in ecdsa rsa; do
  cert "$ROOT/cert-$alg" "$alg"
  tambo_start "$ROOT/tambo-$alg" $port "$ROOT/cert-$alg"
  "$BIN/tambo-bench-tls" serve "127.0.0.1:$((port + 10))" \
    --cert "$ROOT/cert-$alg/fullchain.pem" --key "$ROOT/cert-$alg/privkey.pem" >/dev/null &
  until nc -z 127.0.0.1 $((port + 10)) 2>/dev/null; do sleep 0.05; done
  [ $HAVE_CHASQUID = 1 ] && chasquid_start "$ROOT/chasquid-$alg" $((port + 20)) "$ROOT/cert-$alg"
  for r in $(seq "$ROUNDS"); do
    inproc=$(rate $((port + 10)))
    tambo=$(rate $port)
    line="$alg round $r: key in process $inproc/s, tambo (key in queued) $tambo/s, ratio $(awk -v a="$tambo" -v b="$inproc" 'BEGIN{printf "%.2f", a/b}')"
    if [ $HAVE_CHASQUID = 1 ]; then
      ch=$(rate $((port + 20)))
      line="$line; chasquid $ch/s, tambo/chasquid $(awk -v a="$tambo" -v b="$ch" 'BEGIN{printf "%.2f", a/b}')"
    fi
    echo "$line"
  done
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  port=$((port + 100))
done

# status_kib PID FIELD
status_kib() { awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status"; }
# idle NAME PORT PGREP-PATTERN: PSS before and with N idle TLS sessions.
idle() {
  local name=$1 port=$2 pattern=$3 pids before after line
  python3 bench/idle_conns.py --tls 127.0.0.1 "$port" 1 </dev/null >/dev/null
  sleep 1
  pids=$(pgrep -f "$pattern" | tr '\n' ' ')
  before=$(pss $pids)
  coproc CLIENT { python3 bench/idle_conns.py --tls 127.0.0.1 "$port" "$N"; }
  read -r line <&"${CLIENT[0]}"
  [ "$line" = ready ] || { echo "$name: client failed: $line" >&2; exit 1; }
  sleep 2
  after=$(pss $pids)
  awk -v n="$name" -v b="$before" -v a="$after" -v c="$N" 'BEGIN {
    printf "%-9s PSS %6d KiB idle, %6d KiB with %d TLS sessions: %.1f KiB per idle TLS session\n", n, b, a, c, (a - b) / c }'
  if [ "$name" = tambo ]; then
    for d in smtpd queued; do
      local pid
      pid=$(pgrep -f "tambo-$d --config_dir $ROOT/idle-tambo/config" | head -1)
      echo "          $d: peak RSS $(status_kib "$pid" VmHWM) KiB, RSS now $(status_kib "$pid" VmRSS) KiB"
    done
  fi
  kill "$CLIENT_PID" 2>/dev/null || true
  wait "$CLIENT_PID" 2>/dev/null || true
}

echo "== memory with $N idle TLS sessions (ECDSA P-256)"
tambo_start "$ROOT/idle-tambo" 24500 "$ROOT/cert-ecdsa"
idle tambo 24500 "tambo-.* --config_dir $ROOT/idle-tambo/config"
kill $(jobs -p) 2>/dev/null || true
wait 2>/dev/null || true
if [ $HAVE_CHASQUID = 1 ]; then
  chasquid_start "$ROOT/idle-chasquid" 24600 "$ROOT/cert-ecdsa"
  idle chasquid 24600 "chasquid -config_dir $ROOT/idle-chasquid/config"
fi
