#!/usr/bin/env bash
# The test command (README "Testing"; .ci/run runs exactly this): formatting,
# lints, the unsafe-code rule, then every unit and end-to-end test.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

# unsafe code is allowed in exactly one audited module (STYLE.md).
if grep -rnE 'unsafe[[:space:]]*(\{|fn|impl)' --include='*.rs' . --exclude-dir=target | grep -v '^./proto/src/fd.rs:'; then
  echo "unsafe code outside proto/src/fd.rs" >&2
  exit 1
fi

# The end-to-end tests start the real daemons, so build them first.
cargo build --workspace --locked
cargo test --workspace --locked
