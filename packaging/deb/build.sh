#!/usr/bin/env bash
# Builds the Debian package from this tree with dpkg-deb alone:
#
#   packaging/deb/build.sh [bin_dir]
#
# bin_dir holds the five binaries (default: a release build made here).
# Writes target/debian/tambo_<version>_<arch>.deb and prints its path.
#
# Why not cargo-deb or debian/ with dpkg-buildpackage: this needs nothing
# but dpkg-deb (in every Debian), the whole layout is in this one file for
# an auditor to read, and a distribution that wants a source package can
# still write its own debian/ from it.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-}
if [ -z "$BIN" ]; then
  cargo build --release --workspace --locked 2>&1 | tail -1
  BIN=$PWD/target/release
fi
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
ARCH=$(dpkg --print-architecture)
OUT=$PWD/target/debian
ROOT=$(mktemp -d "${TMPDIR:-/tmp}/tambo-deb.XXXXXX")
trap 'rm -rf "$ROOT"' EXIT
umask 022

install -d "$ROOT/DEBIAN" "$ROOT/usr/sbin" "$ROOT/lib/systemd/system" \
  "$ROOT/usr/lib/sysusers.d" "$ROOT/usr/lib/tmpfiles.d" "$ROOT/etc/tambo/hooks" \
  "$ROOT/usr/share/man/man5" "$ROOT/usr/share/man/man8" "$ROOT/usr/share/doc/tambo"
for b in tambo tambo-smtpd tambo-queued tambo-deliverd tambo-monitord; do
  install -m 0755 -s "$BIN/$b" "$ROOT/usr/sbin/$b" 2>/dev/null || install -m 0755 "$BIN/$b" "$ROOT/usr/sbin/$b"
done
install -m 0644 packaging/systemd/*.service packaging/systemd/*.socket packaging/systemd/tambo.target "$ROOT/lib/systemd/system/"
install -m 0644 packaging/sysusers.d/tambo.conf "$ROOT/usr/lib/sysusers.d/tambo.conf"
install -m 0644 packaging/tmpfiles.d/tambo.conf "$ROOT/usr/lib/tmpfiles.d/tambo.conf"
install -m 0644 packaging/tambo.conf "$ROOT/etc/tambo/tambo.conf"
install -d "$ROOT/etc/fail2ban/filter.d"
install -m 0644 fail2ban/filter.d/tambo.conf "$ROOT/etc/fail2ban/filter.d/tambo.conf"
for p in packaging/man/*.8; do gzip -9n < "$p" > "$ROOT/usr/share/man/man8/$(basename "$p").gz"; done
for p in packaging/man/*.5; do gzip -9n < "$p" > "$ROOT/usr/share/man/man5/$(basename "$p").gz"; done
install -m 0644 README.md "$ROOT/usr/share/doc/tambo/README.md"
install -m 0644 docs/security.md "$ROOT/usr/share/doc/tambo/security.md"
cat > "$ROOT/usr/share/doc/tambo/copyright" <<COPY
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: tambo
License: $(sed -n 's/^license = "\(.*\)"/\1/p' Cargo.toml | head -1)
COPY

printf '%s\n' /etc/tambo/tambo.conf /etc/fail2ban/filter.d/tambo.conf > "$ROOT/DEBIAN/conffiles"
SIZE=$(du -sk "$ROOT" | cut -f1)
cat > "$ROOT/DEBIAN/control" <<CONTROL
Package: tambo
Version: $VERSION
Architecture: $ARCH
Maintainer: tambo developers <tambo@example.org>
Installed-Size: $SIZE
Depends: systemd (>= 247), libc6
Recommends: ca-certificates
Provides: mail-transport-agent
Conflicts: mail-transport-agent
Replaces: mail-transport-agent
Section: mail
Priority: optional
Description: mail server split into four least-privileged processes
 tambo receives mail over SMTP and submission, queues it durably and
 delivers it locally or to other servers. smtpd faces the internet and
 holds no secret; queued keeps the queue, users and keys and has no
 network; deliverd delivers and is the only one that runs programs;
 monitord serves the counters. Each runs as its own user under its own
 hardened systemd unit.
CONTROL
cat > "$ROOT/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  systemd-sysusers tambo.conf
  systemd-tmpfiles --create tambo.conf
  # The keys, users and aliases are queued's to read.
  mkdir -p /etc/tambo/certs /etc/tambo/domains
  chown root:tambo-queue /etc/tambo/certs /etc/tambo/domains
  chmod 0750 /etc/tambo/certs /etc/tambo/domains
  # sendmail and mailq for cron, mdadm and scripts: tambo, by that name.
  update-alternatives --install /usr/sbin/sendmail sendmail /usr/sbin/tambo 25 \
    --slave /usr/bin/mailq mailq /usr/sbin/tambo \
    --slave /usr/lib/sendmail sendmail-lib /usr/sbin/tambo
  # On the first install only (an upgrade keeps an admin's `disable`).
  # Enabling works without a running systemd too (a chroot, an image).
  if [ -z "$2" ]; then
    systemctl enable tambo.target >/dev/null 2>&1 || true
  fi
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
  fi
fi
POSTINST
cat > "$ROOT/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ "$1" = remove ]; then
  update-alternatives --remove sendmail /usr/sbin/tambo
fi
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
  systemctl stop tambo.target 'tambo-*.service' 'tambo-*.socket' || true
  systemctl disable tambo.target >/dev/null || true
fi
PRERM
cat > "$ROOT/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
fi
POSTRM
chmod 0755 "$ROOT/DEBIAN/postinst" "$ROOT/DEBIAN/prerm" "$ROOT/DEBIAN/postrm"

mkdir -p "$OUT"
DEB=$OUT/tambo_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$DEB" >/dev/null
echo "$DEB"
