#!/usr/bin/env bash
# Runs the client examples in examples/clients/ against a real `kabar serve`.
#
#   scripts/check-clients.sh
#
# Builds kabar (the debug build that .ci/run's other steps build too), makes a key for one caller
# with `kabar keys new` (scopes notify and status), and starts `kabar serve` on free loopback
# ports with that key file and the log driver (nothing goes to Meta). Then the Python example
# (examples/clients/python/send_invoice.py, grpcio from PyPI in a virtualenv under
# target/venv/clients, made on the first run and reused after):
#   - without the key: it must fail with UNAUTHENTICATED;
#   - with the key: health SERVING, a message id from SendTemplate, and GetMessageStatus ACCEPTED
#     for that id.
# Finally kabar must exit 0 on SIGTERM.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# rustup puts cargo in ~/.cargo/bin; a non-login shell may not have it on PATH.
if ! command -v cargo >/dev/null 2>&1 && [[ -f "${HOME:-/nonexistent}/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
started=$SECONDS

# shellcheck source=scripts/ensure-venv.sh
. scripts/ensure-venv.sh
ensure_venv clients grpcio==1.85.1 grpcio-tools==1.85.1 grpcio-health-checking==1.85.1
python="$VENV/bin/python"

cargo build --bin kabar
kabar="$PWD/target/debug/kabar"
example="$PWD/examples/clients/python/send_invoice.py"

fail() {
    echo "check-clients: $*" >&2
    exit 1
}

work="$(mktemp -d /tmp/kabar-check-clients.XXXXXX)"
kabar_pid=""
cleanup() {
    if [[ -n "$kabar_pid" ]]; then
        kill "$kabar_pid" 2>/dev/null || true
        wait "$kabar_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# One caller: the key (first line) for the example, the [[key]] entry for kabar's key file.
"$kabar" keys new --name example --scope notify --scope status >"$work/key.out" 2>/dev/null
api_key="$(head -n 1 "$work/key.out")"
tail -n +2 "$work/key.out" >"$work/keys.toml"
rm -f "$work/key.out"

free_port() {
    "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
grpc_addr="127.0.0.1:$(free_port)"
http_addr="127.0.0.1:$(free_port)"
webhook_addr="127.0.0.1:$(free_port)"

# A clean environment, and $work as the working directory, so that no .env or variable of this
# shell changes kabar's configuration.
(
    cd "$work"
    exec env -i PATH="$PATH" HOME="${HOME:-/root}" \
        KABAR_GRPC_ADDR="$grpc_addr" KABAR_HTTP_ADDR="$http_addr" KABAR_WEBHOOK_ADDR="$webhook_addr" \
        KABAR_API_KEYS_FILE="$work/keys.toml" WHATSAPP_DRIVER=log KABAR_SHUTDOWN_GRACE_SECONDS=2 \
        "$kabar" serve
) 2>"$work/kabar.log" &
kabar_pid=$!

ready=0
for _ in $(seq 1 200); do
    if ! kill -0 "$kabar_pid" 2>/dev/null; then
        cat "$work/kabar.log" >&2
        fail "kabar serve exited before it listened"
    fi
    if (exec 3<>"/dev/tcp/${grpc_addr%:*}/${grpc_addr#*:}") 2>/dev/null; then
        ready=1
        break
    fi
    sleep 0.05
done
[[ "$ready" == 1 ]] || { cat "$work/kabar.log" >&2; fail "nothing listens on $grpc_addr"; }
echo "check-clients: kabar serve on $grpc_addr (log driver, key file with caller \"example\")"

echo "== python: send_invoice.py without a key (must be refused)"
if KABAR_API_KEY='' "$python" "$example" --target "$grpc_addr" >"$work/nokey.out" 2>"$work/nokey.err"; then
    cat "$work/nokey.out" "$work/nokey.err" >&2
    fail "send_invoice.py without a key succeeded; kabar should have refused it"
fi
cat "$work/nokey.out" "$work/nokey.err"
grep -q '^error: UNAUTHENTICATED' "$work/nokey.err" ||
    fail "send_invoice.py without a key did not fail with UNAUTHENTICATED"

echo "== python: send_invoice.py with the key"
KABAR_API_KEY="$api_key" "$python" "$example" --target "$grpc_addr" >"$work/out" 2>"$work/err" || {
    cat "$work/out" "$work/err" "$work/kabar.log" >&2
    fail "send_invoice.py failed"
}
cat "$work/out"
grep -qx 'health: SERVING' "$work/out" || fail "no 'health: SERVING' line"
message_id="$(sed -n 's/^message_id: //p' "$work/out")"
[[ "$message_id" == wamid.* ]] || fail "no message id from SendTemplate (got '$message_id')"
grep -qx 'phone: +6281234567890' "$work/out" || fail "no normalised phone line"
grep -qx 'status: ACCEPTED template=invoice_notification reference=INV-2026-11-0042' "$work/out" ||
    fail "GetMessageStatus did not answer ACCEPTED for the message"
grep -q "$message_id" "$work/kabar.log" || fail "kabar's log does not show message $message_id"

kill -TERM "$kabar_pid"
status=0
wait "$kabar_pid" || status=$?
kabar_pid=""
[[ "$status" == 0 ]] || { cat "$work/kabar.log" >&2; fail "kabar exited $status on SIGTERM, not 0"; }

echo "check-clients: python example passed in $((SECONDS - started)) s"
