#!/usr/bin/env bash
# Side-by-side load test: tambo and Debian's chasquid on the same machine,
# same client (postfix's smtp-source), same message count and size, and the
# same MDA (a tiny shell script writing one file per message), so the
# figures compare the servers, not the delivery method. tambo is also run
# with its built-in Maildir writer. Run by hand, not in CI:
#
#   bench/compare.sh [sessions=20] [messages=3000]
#
# The sender is the null sender <>: chasquid checks SPF for any other
# sender, and without a reachable DNS server (as in a sandbox) each check
# waits for a timeout, which would measure DNS rather than the server.
#
# Needs: apt-get install postfix chasquid openssl netcat-openbsd (postfix
# only for smtp-source; the Debian chasquid service is stopped first).
set -euo pipefail
cd "$(dirname "$0")/.."
SESSIONS=${1:-20}
MESSAGES=${2:-3000}
PATH=$PATH:/usr/sbin
for c in smtp-source chasquid chasquid-util openssl; do
  command -v $c >/dev/null || { echo "$c not found: apt-get install postfix chasquid openssl" >&2; exit 1; }
done
systemctl stop chasquid 2>/dev/null || true
cargo build --release --workspace --locked 2>&1 | tail -1
BIN=$PWD/target/release
ROOT=$(mktemp -d "${BENCH_TMP:-/tmp}"/tambo-compare.XXXXXX)
chmod 755 "$ROOT"
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$ROOT"' EXIT

cat > "$ROOT/mda.sh" <<'MDA'
#!/bin/sh
# $1 = output directory; one file per message.
exec cat > "$1/$$.$(date +%s%N)"
MDA
chmod +x "$ROOT/mda.sh"

now() { date +%s.%N; }

# run NAME PORT OUTDIR PIDPATTERN...: load, wait for every delivery, report.
run() {
  local name=$1 port=$2 out=$3; shift 3
  local start accepted drained
  start=$(now)
  smtp-source -s "$SESSIONS" -m "$MESSAGES" -l 1024 -f "" -t ann@example.test "127.0.0.1:$port"
  accepted=$(now)
  while [ "$(find "$out" -type f | wc -l)" -lt "$MESSAGES" ]; do sleep 0.05; done
  drained=$(now)
  awk -v n="$name" -v s="$start" -v a="$accepted" -v d="$drained" -v m="$MESSAGES" 'BEGIN {
    printf "%-22s accepted %7.1f msg/s   accepted+delivered %7.1f msg/s\n", n, m / (a - s), m / (d - s)
  }'
  local rss=0 cpu=0 pid
  for pat in "$@"; do
    for pid in $(pgrep -f "$pat"); do
      rss=$((rss + $(awk '/VmHWM/ {print $2}' /proc/$pid/status)))
      cpu=$(awk -v c="$cpu" -v hz="$(getconf CLK_TCK)" '{printf "%.2f", c + ($14 + $15) / hz}' /proc/$pid/stat)
    done
  done
  echo "$(printf '%-22s' "$name") peak RSS (sum of processes) $((rss / 1024)) MiB, CPU ${cpu}s"
}

. bench/lib.sh

tambo() { # name port delivery-lines
  local name=$1 port=$2 dir="$ROOT/$1"
  mkdir -p "$dir/config/domains/example.test" "$dir/out"
  tambo_cert "$dir/config" bench.example.test
  echo 'ann !' > "$dir/config/domains/example.test/users"
  cat > "$dir/config/tambo.conf" <<CONF
hostname = "bench.example.test"
smtp_address = ["127.0.0.1:$port"]
submission_address = []
submission_over_tls_address = []
data_dir = "$dir/data"
max_queue_items = 100000
mail_delivery_agent_bin = "$ROOT/mda.sh"
mail_delivery_agent_args = ["$dir/out"]
[tambo]
runtime_dir = "$dir/run"
$TAMBO_USERS
$3
CONF
  "$BIN/tambo" run --config_dir "$dir/config" 2>"$dir/log" &
  until grep -q "smtpd listening" "$dir/log" && grep -q "connected to queued" "$dir/log"; do sleep 0.1; done
  run "$name" "$port" "$dir/out" "tambo-.* --config_dir $dir/config"
  kill %% 2>/dev/null; wait %% 2>/dev/null || true
}

chasquid_run() {
  local port=$1 dir="$ROOT/chasquid"
  mkdir -p "$dir/config/domains/example.test" "$dir/config/certs/bench" "$dir/out"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=bench.example.test \
    -keyout "$dir/config/certs/bench/privkey.pem" -out "$dir/config/certs/bench/fullchain.pem" 2>/dev/null
  chasquid-util -C="$dir/config" user-add ann@example.test --password=benchpassword >/dev/null
  cat > "$dir/config/chasquid.conf" <<CONF
hostname: "bench.example.test"
smtp_address: "127.0.0.1:$port"
submission_address: "127.0.0.1:$((port + 1))"
submission_over_tls_address: "127.0.0.1:$((port + 2))"
mail_delivery_agent_bin: "$ROOT/mda.sh"
mail_delivery_agent_args: "$dir/out"
data_dir: "$dir/data"
mail_log_path: "$dir/mail.log"
CONF
  chasquid -config_dir "$dir/config" 2>"$dir/log" &
  until grep -q "Listening on" "$dir/log" 2>/dev/null || nc -z 127.0.0.1 "$port" 2>/dev/null; do sleep 0.1; done
  sleep 0.5
  run "chasquid (MDA)" "$port" "$dir/out" "chasquid -config_dir $dir/config"
  kill %% 2>/dev/null; wait %% 2>/dev/null || true
}

echo "sessions=$SESSIONS messages=$MESSAGES size=1KiB, $(nproc) cores"
tambo "tambo-mda" 32600 ""
chasquid_run 32610
tambo "tambo-maildir" 32620 "maildir = \"$ROOT/tambo-maildir/out/%to_user%\""
