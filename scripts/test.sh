#!/usr/bin/env bash
# The test command (README "Testing"; .ci/run runs exactly this): formatting,
# lints, the unsafe-code rule, then every unit and end-to-end test.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real clients the end-to-end tests talk to tambo with, and the real Dovecot
# they authenticate against (Debian packages: `command:package`). dovecot
# lives in /usr/sbin, which a normal user's PATH may lack.
missing=()
# systemd-analyze, -sysusers and -tmpfiles check the units and the files
# of packaging/ (they run on files, without a running systemd); man renders
# the man pages the Debian package ships.
# As root, systemd-nspawn and debootstrap boot the package under a real
# systemd in a container (e2e/support/systemd-boot.sh; skipped otherwise).
# fail2ban-regex checks the shipped filter against the mail log;
# chasquid-util makes the chasquid config the import is tested with;
# promtool (Prometheus's own parser) reads /metrics; go's pprof reads the
# profiles of /debug/pprof.
tools="swaks:swaks msmtp:msmtp openssl:openssl dovecot:dovecot-core systemd-analyze:systemd useradd:passwd man:man-db fail2ban-regex:fail2ban chasquid-util:chasquid promtool:prometheus go:golang-go"
if [ "$(id -u)" = 0 ]; then
  tools="$tools systemd-nspawn:systemd-container debootstrap:debootstrap"
fi
for pair in $tools; do
  tool=${pair%%:*}
  command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || missing+=("${pair#*:}")
done
# Dovecot's LMTP server, which local delivery over LMTP is tested against
# (`file:package`: it is no command on PATH, only a program dovecot runs).
for pair in /usr/lib/dovecot/lmtp:dovecot-lmtpd; do
  [ -x "${pair%%:*}" ] || missing+=("${pair#*:}")
done
# Python modules for Debian's /usr/bin/python3 (`module:package`): aiosmtpd
# runs e2e/support/mx.py, the independent SMTP/LMTP server remote delivery
# is tested against; dkimpy checks tambo's DKIM signatures, with PyNaCl for
# ed25519 (python3-dkim depends on it; named so the check sees it). A
# directory test, so nothing starts when all are there.
for pair in aiosmtpd:python3-aiosmtpd dkim:python3-dkim nacl:python3-nacl; do
  [ -d "/usr/lib/python3/dist-packages/${pair%%:*}" ] || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]} for the end-to-end tests"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "the end-to-end tests need: ${missing[*]} (apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

# The Debian the package is booted on (as root only: a container needs
# it): this machine's release from its own mirror, made once and kept in
# target/. Its machine-id is left empty, so each boot makes its own.
ROOTFS=${CARGO_TARGET_DIR:-target}/debian/rootfs
if [ "$(id -u)" = 0 ] && [ ! -e "$ROOTFS/.complete" ]; then
  suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
  mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null)
  echo "debootstrapping $suite into $ROOTFS for the systemd boot test"
  # A debootstrap killed half-way may leave its /proc mounted there.
  umount -R "$ROOTFS.tmp/proc" "$ROOTFS.tmp/sys" 2>/dev/null || true
  rm -rf --one-file-system "$ROOTFS.tmp" && mkdir -p "$(dirname "$ROOTFS")"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus "$suite" "$ROOTFS.tmp" \
    "${mirror:-http://deb.debian.org/debian}" >"$ROOTFS.log" 2>&1 || { tail -20 "$ROOTFS.log" >&2; exit 1; }
  : >"$ROOTFS.tmp/etc/machine-id"
  touch "$ROOTFS.tmp/.complete"
  rm -rf "$ROOTFS" && mv "$ROOTFS.tmp" "$ROOTFS"
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

# unsafe code is allowed only in the audited modules, one per need
# (STYLE.md): received descriptors, the CPU sampler, the heap sampler.
audited='^./(proto/src/fd.rs|common/src/profile/cpu.rs|common/src/profile/heap.rs):'
if grep -rnE 'unsafe[[:space:]]*(\{|fn|impl)' --include='*.rs' . --exclude-dir=target | grep -vE "$audited"; then
  echo "unsafe code outside the audited modules" >&2
  exit 1
fi

# The end-to-end tests start the real daemons, so build them first.
cargo build --workspace --locked
cargo test --workspace --locked

# Every fuzz target for a short fixed time (FUZZ_SECONDS each, 10 unless
# set; 0 skips them; an hour by hand: FUZZ_SECONDS=3600). libFuzzer's
# coverage instrumentation on stable Rust, without sanitizers: what
# `cargo fuzz run -s none` does, without needing cargo-fuzz. New inputs
# go to target/fuzz/corpus (fuzz/corpus holds the seeds); a crash fails
# the run and leaves its input in target/fuzz/artifacts.
FUZZ_SECONDS=${FUZZ_SECONDS:-10}
if [ "$FUZZ_SECONDS" != 0 ]; then
  # With --target, the flags reach the targets but not build scripts
  # (which libFuzzer's runtime is not linked into).
  host=$(rustc -vV | sed -n 's/^host: //p')
  RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
    cargo build --manifest-path fuzz/Cargo.toml --release --locked --bins --target-dir target/fuzz \
      --target "$host"
  for src in fuzz/fuzz_targets/*.rs; do
    name=$(basename "$src" .rs)
    rm -rf "target/fuzz/artifacts/$name"
    mkdir -p "target/fuzz/corpus/$name" "target/fuzz/artifacts/$name" "fuzz/corpus/$name"
    log="target/fuzz/$name.log"
    if ! "target/fuzz/$host/release/$name" -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 \
      -artifact_prefix="target/fuzz/artifacts/$name/" \
      "target/fuzz/corpus/$name" "fuzz/corpus/$name" >"$log" 2>&1; then
      tail -40 "$log" >&2
      echo "fuzz target $name failed; its input is in target/fuzz/artifacts/$name" >&2
      exit 1
    fi
    echo "fuzz $name: $(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}') inputs in ${FUZZ_SECONDS}s"
  done
fi
