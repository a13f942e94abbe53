#!/usr/bin/env bash
# tambo against itself: this checkout and another build, in turns, with
# bench/smtp-load.sh on a freshly made ext4 for every run (bench/freshfs.sh,
# so neither inherits the other's deleted files). Run as root, by hand:
#
#   git worktree add /work/base <rev>
#   (cd /work/base && cargo build --release --workspace)
#   bench/ab.sh /work/base [rounds=3] [sessions=1] [messages=2000]
#
# Prints, per run, msg/s accepted and the four daemons' CPU seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
OTHER=$(cd "$1" && pwd)
ROUNDS=${2:-3}
SESSIONS=${3:-1}
MESSAGES=${4:-2000}
HERE=$PWD
trap 'bench/freshfs.sh --remove' EXIT
# Both builds are run by this checkout's scripts.
cargo build --release --workspace --locked 2>&1 | tail -1
for r in $(seq "$ROUNDS"); do
  for tree in "$OTHER" "$HERE"; do
    out=$(BENCH_TMP=$(bench/freshfs.sh) BIN_OVERRIDE="$tree/target/release" \
      bench/smtp-load.sh "$SESSIONS" "$MESSAGES" 2>&1)
    acc=$(echo "$out" | awk '/^accepted:/ {print $2}')
    cpu=$(echo "$out" | awk '/CPU/ {gsub("s", "", $NF); s += $NF} END {print s}')
    echo "round $r $tree: sessions=$SESSIONS accepted=$acc msg/s cpu=${cpu}s"
  done
done
