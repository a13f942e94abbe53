#!/usr/bin/env bash
# Memory per idle SMTP connection after EHLO, summed over every tambo
# process (PSS from /proc/<pid>/smaps_rollup). Run by hand, not in CI:
#
#   bench/idle-memory.sh [connections=1000]
#
# Starts `tambo run` (release build) in a temp dir, measures the PSS of the
# four daemons, opens N connections that each say EHLO and then idle,
# measures again, and prints the difference per connection.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}
cargo build --release --workspace --locked 2>&1 | tail -1
BIN=$PWD/target/release
DIR=$(mktemp -d /tmp/tambo-idle.XXXXXX)
chmod 755 "$DIR"
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT
mkdir -p "$DIR/config/domains/example.test"
echo 'ann !' > "$DIR/config/domains/example.test/users"
PORT=${PORT:-32526}
USERS=""
if [ "$(id -u)" = 0 ]; then
  # As root, tambo run drops smtpd and monitord to their users; use ones
  # every Debian system has.
  USERS='smtpd_user = "nobody"
monitord_user = "nobody"
queued_user = "root"
deliverd_user = "root"'
fi
cat > "$DIR/config/tambo.conf" <<CONF
hostname = "bench.example.test"
smtp_address = ["127.0.0.1:$PORT"]
submission_address = []
submission_over_tls_address = []
data_dir = "$DIR/data"
[tambo]
runtime_dir = "$DIR/run"
maildir = "$DIR/mail/%to_domain%/%to_user%"
$USERS
CONF

ulimit -n "$(ulimit -Hn)"
"$BIN/tambo" run --config_dir "$DIR/config" 2>"$DIR/tambo.log" &
for _ in $(seq 200); do
  grep -q "smtpd listening" "$DIR/tambo.log" && grep -q "connected to queued" "$DIR/tambo.log" && break
  sleep 0.05
done

pss() {
  local total=0
  for p in smtpd queued deliverd monitord; do
    pid=$(pgrep -n -f "tambo-$p --config_dir $DIR/config")
    kib=$(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup")
    echo "  tambo-$p: $kib KiB" >&2
    total=$((total + kib))
  done
  echo "$total"
}

# Warm up: one connection, so lazily built state is not counted per idle one.
python3 bench/idle_conns.py 127.0.0.1 "$PORT" 1 </dev/null >/dev/null
sleep 1
echo "before (PSS):" >&2
before=$(pss)
coproc CLIENT { python3 bench/idle_conns.py 127.0.0.1 "$PORT" "$N"; }
read -r line <&"${CLIENT[0]}"
[ "$line" = ready ] || { echo "client failed: $line" >&2; exit 1; }
sleep 2
echo "with $N idle connections (PSS):" >&2
after=$(pss)
echo "total PSS: before $before KiB, after $after KiB"
awk -v b="$before" -v a="$after" -v n="$N" 'BEGIN { printf "per idle connection after EHLO: %.1f KiB\n", (a - b) / n }'
