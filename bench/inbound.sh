#!/usr/bin/env bash
# What the inbound checks cost: accepted msg/s with N sessions (postfix's
# smtp-source, 1 KiB messages to a local user) for three servers started
# side by side and measured in turns, round after round:
#
#   off     tambo before the inbound-policy work (BASE_REV, default
#           95d7291): no SPF, no DKIM verification, no hooks;
#   checks  this tambo: SPF (the sender domain publishes a record that
#           passes), the incoming security level, the header check,
#           Authentication-Results (unsigned mail: written by queued);
#   hook    the same plus a trivial hooks/post-data (`echo X-Spam-Score: 0`),
#           so every message also goes through deliverd: DKIM verification
#           and the hook run.
#
#   bench/inbound.sh [sessions=20] [messages=2000] [rounds=3]
#
# Run by hand. Needs postfix (smtp-source); builds this tambo and the
# baseline in release mode. DNS comes from tambo-test-dns on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
SESSIONS=${1:-20}
MESSAGES=${2:-2000}
ROUNDS=${3:-3}
BASE_REV=${BASE_REV:-95d7291}
command -v smtp-source >/dev/null || PATH=$PATH:/usr/sbin
command -v smtp-source >/dev/null || { echo "smtp-source not found: apt-get install postfix" >&2; exit 1; }

cargo build --release --workspace --locked 2>&1 | tail -1
NEW=$PWD/target/release
# The baseline, built from its own sources into its own target dir (or
# BASE_BIN: a directory with its release binaries).
BASE_SRC=$PWD/target/bench-base-src
if [ -n "${BASE_BIN:-}" ]; then
  :
elif [ ! -x "$PWD/target/bench-base/release/tambo" ] || [ "$(cat "$BASE_SRC/.rev" 2>/dev/null)" != "$BASE_REV" ]; then
  rm -rf "$BASE_SRC" && mkdir -p "$BASE_SRC"
  git archive "$BASE_REV" | tar -x -C "$BASE_SRC"
  echo "$BASE_REV" > "$BASE_SRC/.rev"
  (cd "$BASE_SRC" && CARGO_TARGET_DIR=$PWD/../bench-base cargo build --release --workspace --locked 2>&1 | tail -1)
fi
BASE=${BASE_BIN:-$PWD/target/bench-base/release}

ROOT=$(mktemp -d "${BENCH_TMP:-/tmp}"/tambo-bench-inbound.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$ROOT"' EXIT
. bench/lib.sh
chmod 755 "$ROOT"

SENDER_DOMAIN=bench-sender.example
"$NEW/tambo-test-dns" "$SENDER_DOMAIN=v=spf1 ip4:127.0.0.0/8 -all" > "$ROOT/dns.addr" &
for _ in $(seq 50); do [ -s "$ROOT/dns.addr" ] && break; sleep 0.1; done
DNS=$(cat "$ROOT/dns.addr")

# setup NAME PORT
setup() {
  local dir=$ROOT/$1
  mkdir -p "$dir/config/domains/example.test" "$dir/logs"
  tambo_cert "$dir/config" bench.example.test
  echo 'ann !' > "$dir/config/domains/example.test/users"
  cat > "$dir/config/tambo.conf" <<CONF
hostname = "bench.example.test"
smtp_address = ["127.0.0.1:$2"]
submission_address = []
submission_over_tls_address = []
data_dir = "$dir/data"
max_queue_items = 100000
[tambo]
runtime_dir = "$dir/run"
maildir = "$dir/mail/%to_domain%/%to_user%"
$TAMBO_USERS
[testing]
dns_server = "$DNS"
CONF
}

# start NAME BIN_DIR
start() {
  tambo_start "$2" "$ROOT/$1/config" "$ROOT/$1/logs/tambo.log"
}

declare -A PORT=([off]=32725 [checks]=32726 [hook]=32727) BIN=([off]=$BASE [checks]=$NEW [hook]=$NEW)
for n in off checks hook; do setup "$n" "${PORT[$n]}"; done
mkdir -p "$ROOT/hook/config/hooks"
printf '#!/bin/sh\necho "X-Spam-Score: 0"\n' > "$ROOT/hook/config/hooks/post-data"
chmod 755 "$ROOT/hook/config/hooks/post-data"
for n in off checks hook; do start "$n" "${BIN[$n]}"; done

# Whether any server still has a queue item (queued's .lock stays).
busy() {
  for n in off checks hook; do
    [ -n "$(find "$ROOT/$n/data/queue" -name 'm:*' -print -quit 2>/dev/null)" ] && return 0
  done
  return 1
}

# run NAME: msg/s accepted, once every server's queue is empty (no
# delivery of an earlier run competes for the CPU).
run() {
  local s e
  while busy; do sleep 0.05; done
  s=$(date +%s.%N)
  smtp-source -s "$SESSIONS" -m "$MESSAGES" -l 1024 -f "sender@$SENDER_DOMAIN" -t ann@example.test "127.0.0.1:${PORT[$1]}" >&2 || { echo "smtp-source failed against $1" >&2; exit 1; }
  e=$(date +%s.%N)
  awk -v s="$s" -v e="$e" -v m="$MESSAGES" 'BEGIN {printf "%.1f", m / (e - s)}'
}

declare -A RESULTS
for r in $(seq "$ROUNDS"); do
  for n in off checks hook; do
    v=$(run "$n") || exit 1
    RESULTS[$n]="${RESULTS[$n]:-} $v"
    echo "round $r $n: $v msg/s"
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
off=$(echo "${RESULTS[off]}" | median)
echo "sessions=$SESSIONS messages=$MESSAGES size=1KiB rounds=$ROUNDS (medians)"
for n in off checks hook; do
  m=$(echo "${RESULTS[$n]}" | median)
  awk -v n="$n" -v m="$m" -v o="$off" 'BEGIN {printf "%-7s %7.1f msg/s  %.2fx off\n", n, m, m / o}'
done
while busy; do sleep 0.05; done
for n in off checks hook; do
  got=$(find "$ROOT/$n/mail/example.test/ann/new" -type f | wc -l)
  want=$((ROUNDS * MESSAGES))
  [ "$got" = "$want" ] || { echo "$n delivered $got messages, not $want" >&2; exit 1; }
done
echo "every server delivered all $((ROUNDS * MESSAGES)) messages"
one=$(find "$ROOT/hook/mail/example.test/ann/new" -type f -print -quit)
grep -q '^X-Spam-Score: 0' "$one" && echo "hook: X-Spam-Score present in the delivered mail"
