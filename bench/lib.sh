# Sourced by the bench scripts.

# As root, `tambo run` drops smtpd and monitord to their configured users,
# which must exist: use ones every Debian system has. As a normal user
# everything runs as that user, and the defaults do.
TAMBO_USERS=""
if [ "$(id -u)" = 0 ]; then
  TAMBO_USERS='smtpd_user = "nobody"
monitord_user = "nobody"
queued_user = "root"
deliverd_user = "root"'
fi

# tambo_cert CONFIG_DIR HOST: a self-signed certificate in certs/bench/
# (queued refuses to start without one).
tambo_cert() {
  mkdir -p "$1/certs/bench"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=$2" -addext "subjectAltName=DNS:$2" \
    -keyout "$1/certs/bench/privkey.pem" -out "$1/certs/bench/fullchain.pem" 2>/dev/null
}

# pss PID...: PSS in KiB, summed over the pids given.
pss() {
  local total=0 kib
  for pid in "$@"; do
    kib=$(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup")
    total=$((total + kib))
  done
  echo "$total"
}

# tambo_bin: the release directory to run, BIN_OVERRIDE (another build's,
# for bench/ab.sh) or this checkout's, built first.
tambo_bin() {
  if [ -n "${BIN_OVERRIDE:-}" ]; then
    echo "$BIN_OVERRIDE"
  else
    cargo build --release --workspace --locked >&2 2>/dev/null || { echo "build failed" >&2; exit 1; }
    echo "$PWD/target/release"
  fi
}

# tambo_start BIN_DIR CONFIG_DIR LOG: `tambo run` in the background, once
# smtpd listens and deliverd is connected; exits the script if it does not
# come up.
tambo_start() {
  "$1/tambo" run --config_dir "$2" 2>"$3" &
  for _ in $(seq 100); do
    grep -q "smtpd listening" "$3" && grep -q "connected to queued" "$3" && return 0
    sleep 0.1
  done
  echo "tambo did not start; see $3" >&2
  exit 1
}
