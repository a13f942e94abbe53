#!/usr/bin/env bash
# tambo, Debian's Postfix and Debian's chasquid on the same machine, in one
# interleaved run: the table of the performance issue. Run by hand, as
# root, on an otherwise idle machine, not in CI:
#
#   bench/versus.sh [rounds=3] [messages=2000] [idle-connections=300]
#
# The three servers run at once, each in its own cpuacct cgroup (v1, as on
# this machine: the CPU of every process a server ever ran, its exited
# children included). For each round, each scenario runs on each server in
# turn (the order rotates from round to round), with postfix's
# smtp-source as the client and 1 KiB messages to one local user:
#
#   reused   20 sessions, each sending its messages on one connection (-d)
#   conn     20 sessions, one connection per message
#   single   1 session, one connection (-d)
#   100k     20 sessions, 100 KiB messages, one connection each (-d)
#
# and reports, as medians over the rounds: messages accepted per second
# (the client's clock), messages in the Maildir per second (from the first
# connection to the last file), and server CPU ms per message (the
# cgroup's CPU from the start of the scenario until the last message is
# in the Maildir, divided by the messages). And memory per idle
# connection after EHLO: PSS summed over every process in the server's
# cgroup, before and with N connections held open (bench/idle_conns.py),
# on the fresh servers and again after the load.
#
# The sender is the null sender: chasquid checks SPF for any other, and
# tambo too, and this machine has no DNS to answer them (tambo's own
# cost of the checks is bench/inbound.sh's).
#
# Every server fsyncs what it accepts before its 250 and writes each
# message to a Maildir:
# - tambo: its own Maildir writer (file fsync'd, renamed into new/,
#   directory fsync'd), its mail log in a file;
# - Postfix: virtual(8) Maildir delivery (static map), no chroot, anvil
#   limits off, its log in a file through postlogd;
# - chasquid has no Maildir writer: its MDA is `sh -c 'exec dd ...
#   conv=fsync'`, one fork and two execs per message, writing into new/
#   directly. Its queue holds at most 200 messages, fixed in 1.11: when
#   its deliveries fall that far behind, it refuses mail (451) and the
#   client stops; that run is reported as refused and left out of the
#   medians.
#
# BENCH_TMP: where the servers' files go (default /tmp). A directory at
# the top of the file system is placed by ext4 in a block group of its
# own, away from the inodes earlier runs freed.
#
# Needs: apt-get install postfix chasquid openssl python3 (postfix also
# for smtp-source). The system's own postfix and chasquid services are left
# alone: these instances use their own directories and ports.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
MESSAGES=${2:-2000}
IDLE=${3:-300}
PATH=$PATH:/usr/sbin
[ "$(id -u)" = 0 ] || { echo "run as root (Postfix and the cgroups need it)" >&2; exit 1; }
for c in smtp-source postfix postconf chasquid chasquid-util openssl python3; do
  command -v $c >/dev/null || { echo "$c not found: apt-get install postfix chasquid openssl python3" >&2; exit 1; }
done
CG=/sys/fs/cgroup/cpuacct
[ -w $CG ] || { echo "needs the cgroup v1 cpuacct controller at $CG" >&2; exit 1; }
cargo build --release --workspace --locked 2>&1 | tail -1
BIN=$PWD/target/release
ROOT=$(mktemp -d "${BENCH_TMP:-/tmp}"/tambo-versus.XXXXXX)
chmod 755 "$ROOT"
ulimit -n "$(ulimit -Hn)"
. bench/lib.sh

cleanup() {
  postfix -c "$ROOT/postfix/etc" stop >/dev/null 2>&1 || true
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  for s in tambo postfix chasquid; do
    for p in $(cat $CG/bench-$s/cgroup.procs 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
  done
  sleep 0.5
  for s in tambo postfix chasquid; do rmdir $CG/bench-$s 2>/dev/null || true; done
  rm -rf "$ROOT"
}
trap cleanup EXIT

# in_cgroup NAME CMD...: runs CMD in the background inside cgroup NAME.
in_cgroup() {
  local name=$1; shift
  mkdir -p $CG/bench-$name
  (echo $BASHPID > $CG/bench-$name/cgroup.procs; exec "$@") &
}
cpu_ns() { cat $CG/bench-$1/cpuacct.usage; }

# --- tambo ---------------------------------------------------------------
TAMBO_PORT=32700
T=$ROOT/tambo
mkdir -p "$T/config/domains/example.test" "$T/mail"
echo 'ann !' > "$T/config/domains/example.test/users"
tambo_cert "$T/config" bench.example.test
cat > "$T/config/tambo.conf" <<CONF
hostname = "bench.example.test"
smtp_address = ["127.0.0.1:$TAMBO_PORT"]
submission_address = []
submission_over_tls_address = []
data_dir = "$T/data"
max_queue_items = 200000
mail_log_path = "$T/mail.log"
[tambo]
runtime_dir = "$T/run"
maildir = "$T/mail/%to_domain%/%to_user%"
max_sessions = $((IDLE + 100))
max_sessions_per_client = $((IDLE + 100))
$TAMBO_USERS
CONF
in_cgroup tambo "$BIN/tambo" run --config_dir "$T/config" 2>"$T/log"
until grep -q "smtpd listening" "$T/log" && grep -q "connected to queued" "$T/log"; do sleep 0.1; done
TAMBO_OUT=$T/mail/example.test/ann/new

# --- Postfix -------------------------------------------------------------
POSTFIX_PORT=32710
P=$ROOT/postfix
mkdir -p "$P/etc" "$P/queue" "$P/data" "$P/out"
cp /etc/postfix/master.cf /etc/postfix/dynamicmaps.cf "$P/etc/"
cat > "$P/etc/main.cf" <<CONF
compatibility_level = 3.6
queue_directory = $P/queue
data_directory = $P/data
myhostname = bench.example.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
virtual_mailbox_domains = example.test
virtual_mailbox_base = $P/out
virtual_mailbox_maps = static:ann/
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
virtual_minimum_uid = 1
alias_maps =
alias_database =
local_recipient_maps =
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
default_process_limit = $((IDLE + 100))
maillog_file_prefixes = $ROOT
maillog_file = $P/maillog
biff = no
CONF
postconf -c "$P/etc" -X -M smtp/inet
postconf -c "$P/etc" -M -e "127.0.0.1:$POSTFIX_PORT/inet = 127.0.0.1:$POSTFIX_PORT inet n - n - - smtpd"
postconf -c "$P/etc" -F '*/*/chroot = n'
chown postfix "$P/data"
chown 65534:65534 "$P/out"
postfix -c "$P/etc" post-install create-missing >/dev/null 2>&1
in_cgroup postfix postfix -c "$P/etc" start
wait $!
until python3 bench/idle_conns.py 127.0.0.1 $POSTFIX_PORT 1 </dev/null >/dev/null 2>&1; do sleep 0.1; done
POSTFIX_OUT=$P/out/ann/new
mkdir -p "$POSTFIX_OUT" && chown -R 65534:65534 "$P/out"

# --- chasquid ------------------------------------------------------------
CHASQUID_PORT=32720
C=$ROOT/chasquid
mkdir -p "$C/config/domains/example.test" "$C/config/certs/bench" "$C/out/new"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=bench.example.test -addext "subjectAltName=DNS:bench.example.test" \
  -keyout "$C/config/certs/bench/privkey.pem" -out "$C/config/certs/bench/fullchain.pem" 2>/dev/null
chasquid-util -C="$C/config" user-add ann@example.test --password=benchpassword >/dev/null
cat > "$C/config/chasquid.conf" <<CONF
hostname: "bench.example.test"
smtp_address: "127.0.0.1:$CHASQUID_PORT"
submission_address: "127.0.0.1:$((CHASQUID_PORT + 1))"
submission_over_tls_address: "127.0.0.1:$((CHASQUID_PORT + 2))"
mail_delivery_agent_bin: "/bin/sh"
mail_delivery_agent_args: "-c"
mail_delivery_agent_args: "exec dd of=$C/out/new/\$\$ conv=fsync status=none"
data_dir: "$C/data"
mail_log_path: "$C/mail.log"
CONF
in_cgroup chasquid chasquid -config_dir "$C/config" 2>"$C/log"
until python3 bench/idle_conns.py 127.0.0.1 $CHASQUID_PORT 1 </dev/null >/dev/null 2>&1; do sleep 0.1; done
CHASQUID_OUT=$C/out/new

now() { date +%s.%N; }
count() { if [ -d "$1" ]; then ls -U "$1" | wc -l; else echo 0; fi; }

# one SERVER SCENARIO: prints "accepted/s delivered/s cpu-ms-per-message".
one() {
  local server=$1 scenario=$2 port out args n=$MESSAGES
  case $server in
    tambo) port=$TAMBO_PORT out=$TAMBO_OUT ;;
    postfix) port=$POSTFIX_PORT out=$POSTFIX_OUT ;;
    chasquid) port=$CHASQUID_PORT out=$CHASQUID_OUT ;;
  esac
  case $scenario in
    reused) args="-s 20 -d -l 1024" ;;
    conn) args="-s 20 -l 1024" ;;
    single) args="-s 1 -d -l 1024" n=$((MESSAGES / 2)) ;;
    100k) args="-s 20 -d -l 102400" n=$((MESSAGES / 2)) ;;
  esac
  # Nothing is deleted during the run: ext4 scans past recently freed
  # inodes when it allocates one (for up to five minutes), which would
  # slow whichever server comes next.
  local base c0 t0 t1 t2 c1
  base=$(count "$out")
  sync
  c0=$(cpu_ns "$server")
  t0=$(now)
  local err
  # shellcheck disable=SC2086
  if ! err=$(smtp-source $args -m "$n" -f "" -t ann@example.test "127.0.0.1:$port" 2>&1); then
    echo "$server $scenario: $err" >&2
    # A refusal ends smtp-source (chasquid 1.11 refuses past 200 queued
    # messages, a limit it does not let us raise): the run does not
    # count. Anything else is a failure of the benchmark.
    case $err in *"rejected: 4"*) ;; *) exit 1 ;; esac
    # Wait for what it took to arrive (no new message for 15 s: longer
    # than a retry's back-off), so the next run starts with an empty
    # queue.
    local last=-1
    until [ "$(count "$out")" = "$last" ]; do last=$(count "$out"); sleep 15; done
    echo refused
    return
  fi
  t1=$(now)
  until [ "$(count "$out")" -ge "$((base + n))" ]; do sleep 0.02; done
  t2=$(now)
  c1=$(cpu_ns "$server")
  awk -v n="$n" -v t0="$t0" -v t1="$t1" -v t2="$t2" -v c="$((c1 - c0))" \
    'BEGIN { printf "%.0f %.0f %.2f\n", n / (t1 - t0), n / (t2 - t0), c / 1e6 / n }'
}

SERVERS=(tambo postfix chasquid)
SCENARIOS=(reused conn single 100k)
RES=$ROOT/results
: > "$RES"

# idle SERVER PORT: KiB of PSS per idle connection after EHLO.
idle() {
  local server=$1 port=$2 before after line pids
  python3 bench/idle_conns.py 127.0.0.1 "$port" 1 </dev/null >/dev/null
  sleep 1
  pids=$(cat $CG/bench-$server/cgroup.procs | tr '\n' ' ')
  # shellcheck disable=SC2086
  before=$(pss $pids)
  coproc CLIENT { python3 bench/idle_conns.py 127.0.0.1 "$port" "$IDLE"; }
  read -r line <&"${CLIENT[0]}"
  [ "$line" = ready ] || { echo "$server: client failed: $line" >&2; exit 1; }
  sleep 2
  pids=$(cat $CG/bench-$server/cgroup.procs | tr '\n' ' ')
  # shellcheck disable=SC2086
  after=$(pss $pids)
  kill "$CLIENT_PID" 2>/dev/null || true
  wait "$CLIENT_PID" 2>/dev/null || true
  awk -v b="$before" -v a="$after" -v c="$IDLE" 'BEGIN { printf "%.1f\n", (a - b) / c }'
}
# idle_all WHEN: the idle measurement on each server, recorded as WHEN.
idle_all() {
  local s port kib
  for s in "${SERVERS[@]}"; do
    case $s in
      tambo) port=$TAMBO_PORT ;; postfix) port=$POSTFIX_PORT ;; chasquid) port=$CHASQUID_PORT ;;
    esac
    kib=$(idle "$s" "$port")
    echo "idle $1 $s: $kib KiB per connection after EHLO ($IDLE connections)"
    echo "idle-$1 $s $kib" >> "$RES"
  done
}

# Fresh servers first; again after the load, when each has grown and
# freed its buffers (a heap that was used holds on to its pages).
idle_all fresh
echo "$(nproc) cores, $ROUNDS rounds, $MESSAGES messages (single and 100k: half)"
for r in $(seq "$ROUNDS"); do
  for sc in "${SCENARIOS[@]}"; do
    for i in 0 1 2; do
      s=${SERVERS[$(((i + r) % 3))]}
      line=$(one "$s" "$sc")
      echo "round $r $sc $s: accepted/s delivered/s cpu-ms/msg = $line"
      echo "$sc $s $line" >> "$RES"
    done
  done
done

idle_all after-load

echo
python3 - "$RES" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
servers = ["tambo", "postfix", "chasquid"]
def med(sc, s, k):
    v = [float(r[2 + k]) for r in rows if r[0] == sc and r[1] == s and r[2] != "refused"]
    return statistics.median(v) if v else float("nan")
refused = [r for r in rows if len(r) > 2 and r[2] == "refused"]
if refused:
    print("runs refused by the server (not counted):", ", ".join(f"{r[1]} {r[0]}" for r in refused))
print("| scenario | tambo | Postfix | chasquid | tambo / Postfix |")
print("|---|---|---|---|---|")
names = {"reused": "20 sessions, connection reused", "conn": "20 sessions, one connection per message",
         "single": "1 session, reused", "100k": "100 KiB, 20 sessions"}
for k, what in [(0, "accepted msg/s"), (1, "in the Maildir msg/s"), (2, "server CPU ms per message")]:
    for sc in ["reused", "conn", "single", "100k"]:
        v = [med(sc, s, k) for s in servers]
        fmt = "%.2f" if k == 2 else "%.0f"
        print(f"| {what}, {names[sc]} | " + " | ".join(fmt % x for x in v) + f" | {v[0] / v[1]:.2f} |")
for when in ["fresh", "after-load"]:
    idle = {r[1]: float(r[2]) for r in rows if r[0] == "idle-" + when}
    print(f"| memory per idle connection after EHLO (PSS, KiB), {when.replace('-', ' ')} | "
          + " | ".join("%.1f" % idle[s] for s in servers)
          + (f" | {idle['tambo'] / idle['postfix']:.3f} |" if idle["postfix"] > 0 else " | n/a |"))
PY
