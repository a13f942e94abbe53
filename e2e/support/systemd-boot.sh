#!/usr/bin/env bash
# Boots Debian under a real systemd in a container and runs tambo there as
# its package installs it, for e2e/tests/packaging.rs:
#
#   systemd-boot.sh <rootfs> <deb> <tambo-test-peer> <stage dir>
#
# <rootfs> is a debootstrapped Debian (scripts/test.sh makes it); the
# container sees it through a throwaway overlay (--volatile=overlay), so it
# stays clean, and has a network of its own with only loopback. Inside:
# `dpkg -i`, one domain, one certificate, `systemctl enable --now
# tambo-monitoring.socket`, `systemctl start tambo.target`, one message
# over SMTP, hostile IPC peers, a restart. It prints one fact per line
# ("key: value") for the test to check, and the journal at the end.
set -euo pipefail
ROOTFS=$1 DEB=$2 PEER=$3 STAGE=$4

chmod 0755 "$STAGE"
install -m 0644 "$DEB" "$STAGE/tambo.deb"
install -m 0755 "$PEER" "$STAGE/tambo-test-peer"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=mx.example.org \
  -addext subjectAltName=DNS:mx.example.org \
  -keyout "$STAGE/privkey.pem" -out "$STAGE/fullchain.pem" 2>/dev/null
chmod 0644 "$STAGE"/*.pem

# nspawn's own system call filter knows nothing of Landlock: allowed here,
# so the daemons lock themselves down as they would on a host.
systemd-nspawn -D "$ROOTFS" --volatile=overlay --boot --register=no --keep-unit \
  --private-network --quiet --bind-ro="$STAGE:/stage" \
  --system-call-filter="landlock_create_ruleset landlock_add_rule landlock_restrict_self" \
  </dev/null >"$STAGE/console.log" 2>&1 &
NSPAWN=$!
C=
cleanup() {
  local status=$?
  if [ -n "$C" ]; then
    # What the units said, whatever happened.
    echo "--- journal"
    nsenter -t "$C" -a journalctl -o short-monotonic --no-pager -u 'tambo*' 2>&1 | tail -n 80
    nsenter -t "$C" -a systemctl poweroff >/dev/null 2>&1 || true
    for _ in $(seq 100); do kill -0 "$NSPAWN" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$C" 2>/dev/null || true
  fi
  kill -9 "$NSPAWN" 2>/dev/null || true
  wait "$NSPAWN" 2>/dev/null || true
  exit "$status"
}
trap cleanup EXIT

# The container's init is the nspawn child that became systemd.
for _ in $(seq 300); do
  for c in $(cat /proc/"$NSPAWN"/task/*/children 2>/dev/null); do
    [ "$(cat /proc/"$c"/comm 2>/dev/null)" = systemd ] && C=$c
  done
  [ -n "$C" ] && break
  kill -0 "$NSPAWN" 2>/dev/null || { echo "nspawn exited:"; cat "$STAGE/console.log"; exit 1; }
  sleep 0.1
done
[ -n "$C" ] || { echo "no systemd in the container"; cat "$STAGE/console.log"; exit 1; }
ct() { nsenter -t "$C" -a "$@"; }
# Polls a command (at most 30 s) until it succeeds.
until_ok() {
  for _ in $(seq 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

# Until systemd answers on its bus and has finished booting.
booted() { case $(ct systemctl is-system-running 2>/dev/null) in running | degraded) true ;; *) false ;; esac; }
until_ok booted || true
echo "booted: $(ct systemctl is-system-running 2>&1 || true)"
ct dpkg -i /stage/tambo.deb >/dev/null
echo "enabled: $(ct systemctl is-enabled tambo.target)"

ct sh -ec '
  mkdir -p /etc/tambo/domains/example.org /etc/tambo/certs/mx.example.org
  echo "ann \$scrypt\$ln=14,r=8,p=1\$c2FsdHNhbHRzYWx0\$6Q6Yq3UQ1eKnYlN7jW0dXzrdyHYqgM6XdIhrhf9Dpf4" \
    > /etc/tambo/domains/example.org/users
  echo "postmaster: ann" > /etc/tambo/domains/example.org/aliases
  cp /stage/fullchain.pem /stage/privkey.pem /etc/tambo/certs/mx.example.org/
  chown -R root:tambo-queue /etc/tambo/certs /etc/tambo/domains
  chmod -R u=rwX,g=rX,o= /etc/tambo/certs /etc/tambo/domains
  # Monitoring is opt-in: enabled, tambo.target starts it with the rest.
  systemctl enable tambo-monitoring.socket 2>/dev/null
  systemctl start tambo.target
'
for d in smtpd queued deliverd monitord; do
  echo "$d active: $(ct systemctl is-active tambo-$d.service)"
done

# One message, over bash's /dev/tcp (the container has no SMTP client).
ct bash -c '
  exec 3<>/dev/tcp/127.0.0.1/25
  reply() { local l; while IFS= read -r -t 20 l <&3; do [[ $l =~ ^[0-9]{3}\  ]] && { echo "${l%$'"'\r'"'}"; return; }; done; echo timeout; }
  say() { printf "%s\r\n" "$1" >&3; reply; }
  reply >/dev/null
  say "EHLO client.test" >/dev/null
  say "MAIL FROM:<>" >/dev/null
  echo "rcpt: $(say "RCPT TO:<ann@example.org>")"
  say DATA >/dev/null
  printf "Subject: under systemd\r\n\r\nhello\r\n" >&3
  echo "data: $(say .)"
  say QUIT >/dev/null
'
until_ok ct sh -c 'find /var/lib/tambo/mail -type f -path "*/new/*" | grep -q .' || true
echo "maildir: $(ct find /var/lib/tambo/mail -type f -path '*/new/*' | wc -l) in $(ct find /var/lib/tambo/mail -mindepth 2 -maxdepth 2 -type d)"

# sendmail, installed through alternatives, from a pipeline: as root and
# as another user, over local.sock (mode 0666) under the units.
echo "sendmail link: $(ct readlink -f /usr/sbin/sendmail)"
ct sh -c 'printf "Subject: from cron\n\nroot here\n" | /usr/sbin/sendmail -i ann@example.org'
echo "sendmail root: $?"
ct setpriv --reuid=nobody --regid=nogroup --clear-groups sh -c \
  'printf "Subject: from nobody\n\nhi\n" | /usr/sbin/sendmail ann@example.org'
echo "sendmail nobody: $?"
three() { [ "$(ct find /var/lib/tambo/mail -type f -path '*/new/*' | wc -l)" -ge 3 ]; }
until_ok three || true
echo "after sendmail: $(ct find /var/lib/tambo/mail -type f -path '*/new/*' | wc -l)"
echo "sendmail received: $(ct sh -c 'cat /var/lib/tambo/mail/example.org/ann/new/*' | grep -o 'from local user [a-z]* (uid [0-9]*)' | sort | tr '\n' ' ')"

vars() {
  ct timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/1099; printf "GET /debug/vars HTTP/1.0\r\n\r\n" >&3; cat <&3'
}
has_put() { vars | grep -q '"chasquid/queue/putCount": *3'; }
until_ok has_put || true
echo "putCount: $(vars | grep -o '"chasquid/queue/putCount": *[0-9]*' | grep -o '[0-9]*$' || echo none)"

# The mail log: <syslog> by default, so the journal, as "tambo".
has_syslog() { [ "$(ct journalctl -t tambo -o cat | grep -c ' queued ip=')" -ge 3 ]; }
until_ok has_syslog || true
echo "syslog queued lines: $(ct journalctl -t tambo -o cat | grep -c ' queued ip=' || true)"

for d in smtpd queued deliverd monitord; do
  pid=$(ct systemctl show -p MainPID --value tambo-$d.service)
  echo "$d process: $(ct stat -c %U /proc/"$pid") $(ct grep -E '^(NoNewPrivs|CapPrm|CapEff|CapBnd)' /proc/"$pid"/status | tr -s '\t\n' '  ')"
  echo "$d lockdown: $(ct journalctl -o cat -u tambo-$d.service | grep -o 'locked down.*' | head -1)"
  # PrivateUsers=: which users the process's namespace maps.
  echo "$d uid_map: $(ct awk '{print $1 "-" $2 "-" $3}' /proc/"$pid"/uid_map | tr '\n' ' ')"
done
echo "smtpd uid: $(ct id -u tambo-smtpd)"

# Hostile peers: a uid of no role, given the socket's group so the mode
# lets it connect, and a role's user claiming another role.
peer() { ct setpriv --reuid="$1" --regid="$2" --clear-groups /stage/tambo-test-peer client "/run/tambo/$3.sock" "$4" "$5" 2>&1 || true; }
# (A daemon logs the first refusal of a burst: the one checked goes first.)
echo "peer submit nobody: $(peer nobody tambo-smtpd submit smtpd queued)"
echo "peer deliver smtpd-user: $(peer tambo-smtpd tambo-deliver deliver deliverd queued)"
echo "peer deliver nobody: $(peer nobody tambo-deliver deliver deliverd queued)"
echo "peer monitor nobody: $(peer nobody nogroup monitor queued monitord)"
echo "peer submit smtpd-user: $(peer tambo-smtpd tambo-smtpd submit smtpd queued)"
ct journalctl -o cat -u tambo-queued.service -u tambo-monitord.service | grep -i 'refused' | sed 's/^.*Z *//; s/^/refusal: /'

# A restart brings every unit back (each lets go of its sockets in time).
ct systemctl restart tambo.target
for u in tambo-smtpd.service tambo-queued.service tambo-deliverd.service tambo-monitord.service \
  tambo-smtp.socket tambo-submission.socket tambo-submission-tls.socket tambo-monitoring.socket; do
  until_ok ct systemctl is-active --quiet "$u" || true
done
echo "after restart: $(ct systemctl is-active tambo-smtpd.service tambo-queued.service tambo-deliverd.service tambo-monitord.service tambo-smtp.socket tambo-submission.socket tambo-submission-tls.socket tambo-monitoring.socket | tr '\n' ' ')"
echo "failed units: $(ct systemctl list-units --failed --plain --no-legend | wc -l)"
