#!/usr/bin/env bash
# Runs kabar's whole test suite: the one command for a fresh machine and for CI.
#
#   scripts/test.sh                 # everything
#   scripts/test.sh otp             # extra arguments go to cargo nextest / cargo test
#
# The integration tests start their own private redis-server (one per test, on a unix socket)
# and a local HTTP stand-in for Meta, so nothing has to be running beforehand. This script only
# makes sure a redis-server binary exists and tells the tests where it is (REDIS_SERVER).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# rustup puts cargo in ~/.cargo/bin; a fresh login shell may not have it on PATH yet.
if ! command -v cargo >/dev/null 2>&1 && [[ -f "${HOME:-/nonexistent}/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "scripts/test.sh: cargo not found." >&2
    echo "Install Rust with rustup (https://rustup.rs):" >&2
    echo "    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh" >&2
    exit 1
fi

# shellcheck source=scripts/ensure-redis.sh
. scripts/ensure-redis.sh
REDIS_SERVER="$(command -v redis-server)"
export REDIS_SERVER
echo "scripts/test.sh: using $REDIS_SERVER ($("$REDIS_SERVER" --version))" >&2

if cargo nextest --version >/dev/null 2>&1; then
    exec cargo nextest run --workspace --no-fail-fast "$@"
else
    exec cargo test --workspace --no-fail-fast "$@"
fi
