#!/usr/bin/env bash
# Runs every benchmark scenario in one go and prints the targets table (docs/BENCHMARKS.md).
#
#   scripts/bench.sh               # release build, 10 s per scenario
#   scripts/bench.sh --smoke       # debug build, 1 s per scenario: checks that it all works
#   DURATION=20 scripts/bench.sh   # longer runs
#   RUNS=6 scripts/bench.sh        # six runs, then the lowest and highest value of every target
#
# It starts, all on this machine: a private redis-server (unix socket), two Meta stand-ins
# (0 ms and 200 ms), a bare tonic health server, and kabar (with Meta's webhook on); then drives
# each scenario with the project's load generator (examples/loadgen.rs), and times phone parsing
# (benches/phone.rs).
# Results: target/bench/results.jsonl (run N of several: results-N.jsonl).
#
# It fails when any call of any scenario ends in an error or none is answered (the load
# generator exits non-zero), and when kabar does not exit 0 on SIGTERM. It asserts no speed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

profile=release
duration="${DURATION:-10}"
warmup="${WARMUP:-2}"
phones="${PHONES:-200000}"
# Messages sent through kabar before the webhook run (each reported sent, delivered and read
# once: enough that the measured seconds post no duplicates) and before get-status.
webhook_messages="${WEBHOOK_MESSAGES:-150000}"
status_messages="${STATUS_MESSAGES:-10000}"
runs="${RUNS:-1}"
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || { echo "bench: RUNS must be a whole number from 1" >&2; exit 2; }
if [[ "${1:-}" == "--smoke" ]]; then
    profile=dev
    phones=2000
    webhook_messages=2000
    status_messages=500
    duration=1
    warmup=0.3
fi
cargo_flags=()
bin_dir=target/debug
if [[ "$profile" == release ]]; then
    cargo_flags=(--release)
    bin_dir=target/release
fi

# shellcheck source=scripts/ensure-redis.sh
. scripts/ensure-redis.sh

cargo build "${cargo_flags[@]}" --bin kabar --example loadgen
if [[ "$profile" == release ]]; then
    cargo bench --no-run --bench phone
    phone_bench=(cargo bench --quiet --bench phone -- --json)
else
    # A debug build times nothing worth reading: a few calls show that it runs.
    cargo test --no-run --bench phone
    phone_bench=(cargo test --quiet --bench phone -- --json)
fi
kabar="$bin_dir/kabar"
loadgen="$bin_dir/examples/loadgen"

work="$(mktemp -d /tmp/kabar-bench.XXXXXX)"
out=target/bench
mkdir -p "$out"
rm -f "$out"/results* "$out"/spread.md
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null ||
        echo $((20000 + RANDOM % 20000))
}
wait_tcp() { # host:port
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "bench: nothing listens on $1" >&2
    return 1
}

redis-server --port 0 --unixsocket "$work/redis.sock" --save "" --appendonly no --dir "$work" \
    >"$work/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do [[ -S "$work/redis.sock" ]] && break; sleep 0.05; done

meta0="127.0.0.1:$(free_port)"
meta200="127.0.0.1:$(free_port)"
bare="127.0.0.1:$(free_port)"
grpc="127.0.0.1:$(free_port)"
http="127.0.0.1:$(free_port)"
webhook="127.0.0.1:$(free_port)"
app_secret="bench-app-secret-0123456789abcdef"
"$loadgen" meta-standin --addr "$meta0" --latency-ms 0 2>>"$work/meta.log" &
pids+=($!)
"$loadgen" meta-standin --addr "$meta200" --latency-ms 200 2>>"$work/meta.log" &
pids+=($!)
"$loadgen" bare-health --addr "$bare" 2>>"$work/bare.log" &
pids+=($!)
wait_tcp "$meta0"
wait_tcp "$meta200"
wait_tcp "$bare"

start_kabar() { # meta address, log file
    env -i PATH="$PATH" HOME="${HOME:-/root}" \
        KABAR_GRPC_ADDR="$grpc" KABAR_HTTP_ADDR="$http" \
        KABAR_WEBHOOK_ADDR="$webhook" META_APP_SECRET="$app_secret" \
        WHATSAPP_DRIVER=meta WHATSAPP_API_KEY=bench-token META_WA_PHONE_NUMBER_ID=1 \
        META_GRAPH_API_URL="http://$1" \
        REDIS_URL="unix://$work/redis.sock" KABAR_OTP_SECRET="bench-secret-0123456789abcdef-0123456789" \
        KABAR_OTP_RESEND_SECONDS=0 KABAR_OTP_MAX_SENDS_PER_HOUR=1000 KABAR_OTP_MAX_ATTEMPTS=20 \
        KABAR_OTP_DAILY_LIMIT=10000000 \
        KABAR_META_MAX_MPS=100000 KABAR_PAIR_INTERVAL_SECONDS=0 KABAR_META_DAILY_LIMIT=unlimited \
        KABAR_LOG_FORMAT=json KABAR_SHUTDOWN_GRACE_SECONDS=2 \
        "$kabar" serve 2>"$2" &
    kabar_pid=$!
    pids+=("$kabar_pid")
    wait_tcp "$grpc"
    wait_tcp "$webhook"
}
peak_rss_kb() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
stop_kabar() {
    kill -TERM "$kabar_pid"
    wait "$kabar_pid" || { echo "bench: kabar did not exit 0 on SIGTERM" >&2; exit 1; }
}
run() { # label scenario target [extra args]
    local label=$1 scenario=$2 target=$3
    shift 3
    echo "== $label" >&2
    "$loadgen" run --scenario "$scenario" --target "$target" --label "$label" \
        -d "$duration" --warmup "$warmup" --json "$@" | tee -a "$results"
}

bench_once() {
    "${phone_bench[@]}" | tee -a "$results"

    start_kabar "$meta0" "$work/kabar.log"
    run meta-direct-0ms meta-direct "http://$meta0" -c 64
    # kabar's health check is tonic's own health service, as on the bare server: the two differ
    # only by machine noise, which this pair measures. Ratios divide by kabar's health; kabar's
    # own per-call work shows in verify-invalid (a VerifyOtp refused in validation, no Redis).
    # Each is run twice, interleaved, so that drift on a shared machine hits all three.
    run bare-health health "http://$bare" -c 64 -m 4
    run health health "http://$grpc" -c 64 -m 4
    run verify-invalid verify-invalid "http://$grpc" -c 64 -m 4
    run 'bare-health#2' health "http://$bare" -c 64 -m 4
    run 'health#2' health "http://$grpc" -c 64 -m 4
    run 'verify-invalid#2' verify-invalid "http://$grpc" -c 64 -m 4
    run verify verify "http://$grpc" -c 64 -m 4 --phones "$phones" --meta "http://$meta0"
    run send-otp send-otp "http://$grpc" -c 64 -m 4 --phone-offset 0
    run send-template send-template "http://$grpc" -c 64 -m 4 --phone-offset 50000000
    # Meta's webhook: signed POSTs of 100 statuses for messages sent through kabar first, a new
    # connection per POST (kabar's webhook listener answers one request per connection).
    run webhook webhook "http://$grpc" -c 16 --webhook "http://$webhook" --app-secret "$app_secret" \
        --messages "$webhook_messages" --batch 100 --phone-offset 20000000
    # GetMessageStatus over records with four status changes (sent, reported sent, delivered and
    # read through the webhook first).
    run get-status get-status "http://$grpc" -c 64 -m 4 --webhook "http://$webhook" \
        --app-secret "$app_secret" --messages "$status_messages" --phone-offset 30000000
    "$loadgen" redis-memory --url "unix://$work/redis.sock" --json | tee -a "$results"
    rss0=$(peak_rss_kb "$kabar_pid")
    stop_kabar

    start_kabar "$meta200" "$work/kabar-200.log"
    run meta-direct-200ms meta-direct "http://$meta200" -c 256
    run send-template-200ms send-template "http://$grpc" -c 256 -m 4 --phone-offset 70000000
    rss200=$(peak_rss_kb "$kabar_pid")
    # Past KABAR_META_MAX_IN_FLIGHT (512): the calls beyond it wait for a send slot.
    run send-template-200ms-1024 send-template "http://$grpc" -c 1024 -m 4 --phone-offset 80000000
    rss1024=$(peak_rss_kb "$kabar_pid")
    stop_kabar

    echo "{\"label\":\"rss\",\"kabar_peak_rss_kb\":$rss0,\"kabar_200ms_peak_rss_kb\":$rss200,\"kabar_200ms_1024_peak_rss_kb\":$rss1024}" |
        tee -a "$results"
}

machine="$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
all_results=()
for i in $(seq 1 "$runs"); do
    if [[ "$runs" == 1 ]]; then results="$out/results.jsonl"; else results="$out/results-$i.jsonl"; fi
    all_results+=("$results")
    bench_once
    echo
    echo "== run $i of $runs: $machine, profile $profile, ${duration}s per scenario"
    "$loadgen" summarize "$results" | tee "${results%.jsonl}.summary.md"
done
if [[ "$runs" != 1 ]]; then
    echo
    echo "== $runs runs: $machine, profile $profile, ${duration}s per scenario"
    "$loadgen" summarize "${all_results[@]}" | tee "$out/spread.md"
fi
