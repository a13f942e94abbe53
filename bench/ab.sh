#!/usr/bin/env bash
# tambo against itself: this checkout and another build, in turns, with
# bench/smtp-load.sh on a freshly made ext4 for every run (bench/freshfs.sh,
# so neither inherits the other's deleted files). Run as root, by hand:
#
#   git worktree add /work/base <rev>
#   (cd /work/base && cargo build --release --workspace)
#   bench/ab.sh /work/base [rounds=3] [sessions=1] [messages=2000]
#
# Prints, per run, msg/s accepted and the four daemons' CPU seconds. The
# order of the two alternates from round to round.
#
# AB_DISK=1 runs on the root file system instead, each run in a new
# directory at its top (ext4 puts one in a block group of its own, away
# from the last run's freed inodes): the disk's own fsync cost, which
# the loop device triples.
set -euo pipefail
OTHER=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
ROUNDS=${2:-3}
SESSIONS=${3:-1}
MESSAGES=${4:-2000}
HERE=$PWD
for b in tambo tambo-smtpd tambo-queued tambo-deliverd tambo-monitord; do
  [ -x "$OTHER/target/release/$b" ] || { echo "no $OTHER/target/release/$b: build it first" >&2; exit 1; }
done
if [ -n "${AB_DISK:-}" ]; then
  trap 'rm -rf /tambo-ab.*' EXIT
else
  trap 'bench/freshfs.sh --remove' EXIT
fi
# Both builds are run by this checkout's scripts.
cargo build --release --workspace --locked 2>&1 | tail -1
for r in $(seq "$ROUNDS"); do
  order=("$OTHER" "$HERE")
  [ $((r % 2)) = 0 ] && order=("$HERE" "$OTHER")
  for tree in "${order[@]}"; do
    if [ -n "${AB_DISK:-}" ]; then
      # Removed only at the end: deleting between runs is what slows the
      # next one down.
      fs=$(mktemp -d /tambo-ab.XXXXXX)
      chmod 755 "$fs"
    else
      fs=$(bench/freshfs.sh)
    fi
    [ -n "$fs" ] || { echo "no fresh file system" >&2; exit 1; }
    if ! out=$(BENCH_TMP=$fs BIN_OVERRIDE="$tree/target/release" \
      bench/smtp-load.sh "$SESSIONS" "$MESSAGES" 2>&1); then
      echo "$out" >&2
      exit 1
    fi
    acc=$(echo "$out" | awk '/^accepted:/ {print $2}')
    cpu=$(echo "$out" | awk '/CPU/ {gsub("s", "", $NF); s += $NF} END {print s}')
    echo "round $r $tree: sessions=$SESSIONS accepted=$acc msg/s cpu=${cpu}s"
  done
done
