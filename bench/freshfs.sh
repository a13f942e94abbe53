#!/usr/bin/env bash
# A freshly made ext4 for one benchmark run, so that runs do not inherit
# each other's file-system state: ext4 skips inodes freed in the last
# seconds to minutes when it allocates new ones (`recently_deleted`), and
# after thousands of deleted queue and Maildir files that search alone
# took a third of the machine's CPU (perf, 2026-12-02). Run as root:
#
#   BENCH_TMP=$(bench/freshfs.sh) bench/smtp-load.sh 1 2000
#   bench/freshfs.sh --remove
#
# The image lives next to the repository (not in /tmp, which may be a
# tmpfs) and is attached with direct I/O, so an fsync still reaches the
# disk underneath. Numbers from it compare with each other, not with runs
# on the host's own file system.
set -euo pipefail
MNT=/mnt/tambo-bench
IMG=${BENCH_IMAGE:-$(cd "$(dirname "$0")/.." && pwd)/target/bench-fs.img}
if mountpoint -q "$MNT"; then
  umount "$MNT"
fi
# Every loop device on the image, mounted or left over from a failure.
for dev in $(losetup -j "$IMG" -O NAME -n 2>/dev/null); do
  losetup -d "$dev" || true
done
rm -f "$IMG"
[ "${1:-}" = --remove ] && exit 0
mkdir -p "$MNT" "$(dirname "$IMG")"
truncate -s "${BENCH_FS_SIZE:-4G}" "$IMG"
mkfs.ext4 -q -F "$IMG"
dev=$(losetup --direct-io=on --show -f "$IMG")
mount "$dev" "$MNT"
chmod 1777 "$MNT"
echo "$MNT"
