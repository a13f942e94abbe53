# Sourced by the bench scripts. As root, `tambo run` drops smtpd and
# monitord to their configured users, which must exist: use ones every
# Debian system has. As a normal user everything runs as that user, and
# the defaults do.
TAMBO_USERS=""
if [ "$(id -u)" = 0 ]; then
  TAMBO_USERS='smtpd_user = "nobody"
monitord_user = "nobody"
queued_user = "root"
deliverd_user = "root"'
fi
