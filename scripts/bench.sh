#!/usr/bin/env bash
# Runs every benchmark scenario in one go and prints the targets table (docs/BENCHMARKS.md).
#
#   scripts/bench.sh               # release build, 10 s per scenario
#   scripts/bench.sh --smoke       # debug build, 1 s per scenario: checks that it all works
#   DURATION=20 scripts/bench.sh   # longer runs
#   RUNS=6 scripts/bench.sh        # six runs, then the lowest and highest value of every target
#   scripts/bench.sh --pacing      # only pacing: its overhead and its accuracy (with --smoke too)
#   scripts/bench.sh --batch       # only batch runs: submit rate, Redis per item, a 100,000-item run
#   KEYS=off scripts/bench.sh      # kabar without a key file (the figures before API keys)
#   scripts/bench.sh --keys        # only what keys cost: health, verify-invalid and verify against
#                                  # kabar with a key file and a second kabar without, interleaved
#
# It starts, all on this machine: a private redis-server (unix socket), two Meta stand-ins
# (0 ms and 200 ms), a bare tonic health server, and kabar (with Meta's webhook on); then drives
# each scenario with the project's load generator (examples/loadgen.rs), and times phone parsing
# (benches/phone.rs). Pacing: a second kabar with pacing off beside the first (the overhead), then
# three replicas on one Redis against a stand-in that answers 130429 beyond its cap (accuracy, and
# OTP latency under a saturating SendTemplate load), at caps 80 and 1,000 (--smoke: 80 only).
# Results: target/bench/results.jsonl (run N of several: results-N.jsonl); every POST the capped
# stand-in received in a pacing run: results.arrivals-<cap>.json (results-N.arrivals-<cap>.json).
# Batch runs (--batch only, not part of the full run; --smoke runs small ones): SubmitBatch of
# 100,000 items in calls of 1,000 to a kabar with WHATSAPP_ENABLED=false (the batch pauses at its
# first item, so nothing is sent) with Redis's used_memory before and after; then a 100,000-item
# run to DONE against a stand-in with 200 ms latency and a cap of 1,000/s, KABAR_META_MAX_MPS=1000.
#
# API keys are on by default: kabar runs with KABAR_API_KEYS_FILE (one caller, made with
# `kabar keys new`, scopes otp, notify and status) and every call to a kabar service carries its
# key (the load generator reads KABAR_API_KEY). Health checks go without a key, as a load
# balancer's do (health is open), on kabar and on the bare server alike. KEYS=off: no key file,
# no key sent. --keys: the same kabar with keys beside one without (same Redis, same stand-in),
# health, verify-invalid and verify against both in the order A B B A, and health once more with
# a key sent (health ignores it).
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
# Pacing accuracy: seconds measured per cap, after one second of warm-up at the same load.
pacing_seconds="${PACING_SECONDS:-10}"
pacing_caps=(80 1000)
# Batch runs: items submitted with nothing sent (submit rate, Redis per item), and items of the
# run to DONE at KABAR_META_MAX_MPS=1000 against the 200 ms stand-in capped at 1,000/s.
batch_submit_items="${BATCH_SUBMIT_ITEMS:-100000}"
batch_run_items="${BATCH_RUN_ITEMS:-100000}"
runs="${RUNS:-1}"
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || { echo "bench: RUNS must be a whole number from 1" >&2; exit 2; }
keys="${KEYS:-on}"
[[ "$keys" == on || "$keys" == off ]] || { echo "bench: KEYS must be on or off" >&2; exit 2; }
smoke=0
pacing_only=0
batch_only=0
keys_only=0
for arg in "$@"; do
    case "$arg" in
        --smoke) smoke=1 ;;
        --pacing) pacing_only=1 ;;
        --batch) batch_only=1 ;;
        --keys) keys_only=1 ;;
        *) echo "bench: unknown argument $arg (--smoke, --pacing, --batch, --keys)" >&2; exit 2 ;;
    esac
done
if (( pacing_only + batch_only + keys_only > 1 )); then
    echo "bench: --pacing, --batch and --keys are separate runs; give one of them" >&2
    exit 2
fi
if [[ "$keys_only" == 1 && "$keys" == off ]]; then
    echo "bench: --keys compares kabar with keys and without; it needs KEYS=on" >&2
    exit 2
fi
if [[ "$smoke" == 1 ]]; then
    profile=dev
    phones=2000
    webhook_messages=2000
    status_messages=500
    duration=1
    warmup=0.3
    pacing_seconds=2
    pacing_caps=(80)
    batch_submit_items=5000
    batch_run_items=1000
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
if [[ "$pacing_only" == 1 || "$batch_only" == 1 || "$keys_only" == 1 ]]; then
    phone_bench=(true)
elif [[ "$profile" == release ]]; then
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

# API keys: one caller with the scopes the scenarios use (OTP calls, sends and batches, status
# and batch reads); the key goes to the load generator through its environment, the entry into
# the key file every kabar of the run reads.
keys_env=()
unset KABAR_API_KEY
if [[ "$keys" == on ]]; then
    if ! "$kabar" keys new --name bench --scope otp --scope notify --scope status \
        >"$work/key.out" 2>"$work/key.err"; then
        cat "$work/key.err" >&2
        echo "bench: kabar keys new failed" >&2
        exit 1
    fi
    KABAR_API_KEY="$(head -n 1 "$work/key.out")"
    export KABAR_API_KEY
    tail -n +2 "$work/key.out" >"$work/keys.toml"
    rm -f "$work/key.out"
    keys_env=(KABAR_API_KEYS_FILE="$work/keys.toml")
fi

meta0="127.0.0.1:$(free_port)"
meta200="127.0.0.1:$(free_port)"
bare="127.0.0.1:$(free_port)"
grpc="127.0.0.1:$(free_port)"
http="127.0.0.1:$(free_port)"
webhook="127.0.0.1:$(free_port)"
# The second kabar, with pacing off: the overhead's denominator.
grpc_unpaced="127.0.0.1:$(free_port)"
http_unpaced="127.0.0.1:$(free_port)"
webhook_unpaced="127.0.0.1:$(free_port)"
# --keys: the second kabar, without a key file.
grpc_keyless="127.0.0.1:$(free_port)"
http_keyless="127.0.0.1:$(free_port)"
webhook_keyless="127.0.0.1:$(free_port)"
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

# Pacing stays on, its cap far above any scenario's load (scenarios send thousands a second and
# reuse phones); the variables after the log file override these (later assignments win in env).
launch_kabar() { # grpc http webhook meta-address log-file [VAR=value ...]
    local grpc_addr=$1 http_addr=$2 webhook_addr=$3 meta=$4 log=$5
    shift 5
    env -i PATH="$PATH" HOME="${HOME:-/root}" \
        KABAR_GRPC_ADDR="$grpc_addr" KABAR_HTTP_ADDR="$http_addr" \
        KABAR_WEBHOOK_ADDR="$webhook_addr" META_APP_SECRET="$app_secret" \
        WHATSAPP_DRIVER=meta WHATSAPP_API_KEY=bench-token META_WA_PHONE_NUMBER_ID=1 \
        META_GRAPH_API_URL="http://$meta" \
        REDIS_URL="unix://$work/redis.sock" KABAR_OTP_SECRET="bench-secret-0123456789abcdef-0123456789" \
        KABAR_OTP_RESEND_SECONDS=0 KABAR_OTP_MAX_SENDS_PER_HOUR=1000 KABAR_OTP_MAX_ATTEMPTS=20 \
        KABAR_OTP_DAILY_LIMIT=10000000 \
        KABAR_META_MAX_MPS=100000 KABAR_PAIR_INTERVAL_SECONDS=0 KABAR_META_DAILY_LIMIT=unlimited \
        KABAR_LOG_FORMAT=json KABAR_SHUTDOWN_GRACE_SECONDS=2 \
        "${keys_env[@]}" "$@" "$kabar" serve 2>"$log" &
    launched=$!
    pids+=("$launched")
    wait_tcp "$grpc_addr"
    wait_tcp "$webhook_addr"
}
start_kabar() { # meta address, log file
    launch_kabar "$grpc" "$http" "$webhook" "$1" "$2"
    kabar_pid=$launched
}
peak_rss_kb() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
stop_pid() {
    kill -TERM "$1"
    wait "$1" || { echo "bench: kabar did not exit 0 on SIGTERM" >&2; exit 1; }
}
stop_kabar() { stop_pid "$kabar_pid"; }
run() { # label scenario target [extra args]
    local label=$1 scenario=$2 target=$3
    shift 3
    echo "== $label" >&2
    "$loadgen" run --scenario "$scenario" --target "$target" --label "$label" \
        -d "$duration" --warmup "$warmup" --json "$@" | tee -a "$results"
}
# A run that sends no key: health checks (open, and a load balancer's carry none) and calls to
# the kabar without a key file.
run_without_key() { # label scenario target [extra args]
    KABAR_API_KEY='' run "$@"
}

# Pacing accuracy at one cap: a stand-in that records every POST and answers 130429 beyond the
# cap in any sliding second; three kabar replicas on the one Redis and phone number ID (their own
# ID per cap, so that no earlier schedule carries over), pair interval at its default (6 s; every
# message goes to a new phone), no daily limit; SendTemplate offered at 3x the cap, open loop,
# round-robin over the replicas, each call with a 2 s deadline. Extra arguments go to loadgen.
pacing_run() { # cap [loadgen args]
    local cap=$1 standin replicas=() targets=() r
    shift
    standin="127.0.0.1:$(free_port)"
    "$loadgen" meta-standin --addr "$standin" --cap "$cap" 2>>"$work/meta.log" &
    local standin_pid=$!
    pids+=("$standin_pid")
    wait_tcp "$standin"
    for r in 1 2 3; do
        local g="127.0.0.1:$(free_port)"
        launch_kabar "$g" "127.0.0.1:$(free_port)" "127.0.0.1:$(free_port)" "$standin" \
            "$work/kabar-pacing-$cap-$r.log" \
            META_WA_PHONE_NUMBER_ID="$((9000 + cap))" KABAR_META_MAX_MPS="$cap" \
            KABAR_PAIR_INTERVAL_SECONDS=6 KABAR_META_DAILY_LIMIT=unlimited
        replicas+=("$launched")
        targets+=("http://$g")
    done
    echo "== pacing-$cap" >&2
    "$loadgen" run --scenario pacing --label "pacing-$cap" --cap "$cap" --rate "$((3 * cap))" \
        --deadline-ms 2000 --targets "$(IFS=,; echo "${targets[*]}")" --meta "http://$standin" \
        -d "$pacing_seconds" --warmup 1 --arrivals-out "${results%.jsonl}.arrivals-$cap.json" \
        --json "$@" | tee -a "$results"
    kill -TERM "${replicas[@]}"
    for r in "${replicas[@]}"; do
        wait "$r" || { echo "bench: kabar did not exit 0 on SIGTERM" >&2; exit 1; }
    done
    kill "$standin_pid"
    wait "$standin_pid" 2>/dev/null || true
}

# Pacing's overhead: the same kabar with KABAR_PACING_ENABLED=false (same Redis, same 0 ms
# stand-in), started beside the first and idle until its turn.
start_unpaced() {
    launch_kabar "$grpc_unpaced" "$http_unpaced" "$webhook_unpaced" "$meta0" \
        "$work/kabar-unpaced.log" KABAR_PACING_ENABLED=false
    unpaced_pid=$launched
    warm "$grpc_unpaced"
}
# A kabar's first calls are slow (a debug build's take up to a second): 64 of each send first,
# unrecorded, so that no measured run pays for them.
warm() { # grpc address
    "$loadgen" run --scenario send-otp --target "http://$1" -c 16 -m 1 -n 64 -d 30 --warmup 0 \
        --phone-offset 4000000 >/dev/null
    "$loadgen" run --scenario send-template --target "http://$1" -c 16 -m 1 -n 64 -d 30 \
        --warmup 0 --phone-offset 54000000 >/dev/null
}
# What keys cost (--keys): the same kabar without KABAR_API_KEYS_FILE started beside the first
# (same Redis, same 0 ms stand-in, both warmed), then health, verify-invalid and verify against
# both in the order A B B A, so that drift on a shared machine weighs on both alike; health also
# with a key sent. Every verify run sends its codes first (to the same phones).
keys_runs() {
    start_kabar "$meta0" "$work/kabar.log"
    keys_env=()
    launch_kabar "$grpc_keyless" "$http_keyless" "$webhook_keyless" "$meta0" \
        "$work/kabar-keyless.log"
    local keyless_pid=$launched
    keys_env=(KABAR_API_KEYS_FILE="$work/keys.toml")
    warm "$grpc"
    KABAR_API_KEY='' warm "$grpc_keyless"
    run_without_key bare-health health "http://$bare" -c 64 -m 4
    run_without_key health health "http://$grpc" -c 64 -m 4
    run verify-invalid verify-invalid "http://$grpc" -c 64 -m 4
    run_without_key verify-invalid-nokeys verify-invalid "http://$grpc_keyless" -c 64 -m 4
    run health-with-key health "http://$grpc" -c 64 -m 4
    run_without_key 'bare-health#2' health "http://$bare" -c 64 -m 4
    run_without_key 'health#2' health "http://$grpc" -c 64 -m 4
    run 'health-with-key#2' health "http://$grpc" -c 64 -m 4
    run_without_key 'verify-invalid-nokeys#2' verify-invalid "http://$grpc_keyless" -c 64 -m 4
    run 'verify-invalid#2' verify-invalid "http://$grpc" -c 64 -m 4
    run verify verify "http://$grpc" -c 64 -m 4 --phones "$phones" --meta "http://$meta0"
    run_without_key verify-nokeys verify "http://$grpc_keyless" -c 64 -m 4 --phones "$phones" \
        --meta "http://$meta0"
    run_without_key 'verify-nokeys#2' verify "http://$grpc_keyless" -c 64 -m 4 \
        --phones "$phones" --meta "http://$meta0"
    run 'verify#2' verify "http://$grpc" -c 64 -m 4 --phones "$phones" --meta "http://$meta0"
    stop_pid "$keyless_pid"
    stop_kabar
}
# Paced and unpaced sends interleaved, twice, in the order A B B A, so that drift on a shared
# machine weighs on both alike (--smoke: once); every run to phones of its own. Stops the
# unpaced kabar.
send_runs() {
    run send-otp send-otp "http://$grpc" -c 64 -m 4 --phone-offset 0
    run send-otp-unpaced send-otp "http://$grpc_unpaced" -c 64 -m 4 --phone-offset 1000000
    run send-template send-template "http://$grpc" -c 64 -m 4 --phone-offset 50000000
    run send-template-unpaced send-template "http://$grpc_unpaced" -c 64 -m 4 --phone-offset 51000000
    if [[ "$smoke" == 0 ]]; then
        run 'send-template-unpaced#2' send-template "http://$grpc_unpaced" -c 64 -m 4 \
            --phone-offset 52000000
        run 'send-template#2' send-template "http://$grpc" -c 64 -m 4 --phone-offset 53000000
        run 'send-otp-unpaced#2' send-otp "http://$grpc_unpaced" -c 64 -m 4 --phone-offset 2000000
        run 'send-otp#2' send-otp "http://$grpc" -c 64 -m 4 --phone-offset 3000000
    fi
    stop_pid "$unpaced_pid"
}
# Pacing's accuracy; at cap 80 also one SendOtp every 200 ms to the first replica, timed.
pacing_runs() {
    for cap in "${pacing_caps[@]}"; do
        if [[ "$cap" == 80 ]]; then
            pacing_run "$cap" --phone-offset 90000000 --otp-every-ms 200
        else
            pacing_run "$cap" --phone-offset 96000000
        fi
    done
}

# Batch runs. SubmitBatch (batch-submit): items in calls of 1,000, 4 in flight over 4
# connections, to one batch of a kabar started with WHATSAPP_ENABLED=false: its workers take the
# first items at once, the send is refused as disabled, the batch pauses and every item stays
# queued; so the submit rate is measured with no sending beside it, and Redis's used_memory before
# and after gives the bytes per queued item. Then the run (batch-run): a stand-in with 200 ms
# latency that answers 130429 beyond 1,000 messages in any second, a kabar with
# KABAR_META_MAX_MPS=1000, the pair interval off (every phone is new) and no daily limit (a phone
# number ID of its own); the items are submitted the same way while the workers send, and the run
# is timed from the first SubmitBatch to GetBatch answering DONE.
batch_runs() {
    launch_kabar "$grpc" "$http" "$webhook" "$meta0" "$work/kabar-batch-submit.log" \
        WHATSAPP_ENABLED=false
    local submit_pid=$launched
    echo "== batch-submit" >&2
    "$loadgen" run --scenario batch-submit --label batch-submit --target "http://$grpc" -c 4 -m 4 \
        --items "$batch_submit_items" --per-call 1000 --phone-offset 0 \
        --redis "unix://$work/redis.sock" --json | tee -a "$results"
    stop_pid "$submit_pid"

    local standin
    standin="127.0.0.1:$(free_port)"
    "$loadgen" meta-standin --addr "$standin" --latency-ms 200 --cap 1000 2>>"$work/meta.log" &
    local standin_pid=$!
    pids+=("$standin_pid")
    wait_tcp "$standin"
    launch_kabar "$grpc" "$http" "$webhook" "$standin" "$work/kabar-batch-run.log" \
        META_WA_PHONE_NUMBER_ID=8000 KABAR_META_MAX_MPS=1000 KABAR_PAIR_INTERVAL_SECONDS=0 \
        KABAR_META_DAILY_LIMIT=unlimited
    local run_pid=$launched
    echo "== batch-run" >&2
    "$loadgen" run --scenario batch-run --label batch-run --target "http://$grpc" -c 4 -m 4 \
        --items "$batch_run_items" --per-call 1000 --phone-offset 10000000 \
        --meta "http://$standin" --cap 1000 -d 300 --json | tee -a "$results"
    stop_pid "$run_pid"
    kill "$standin_pid"
    wait "$standin_pid" 2>/dev/null || true
}

bench_once() {
    if [[ "$keys_only" == 1 ]]; then
        keys_runs
        return
    fi
    if [[ "$batch_only" == 1 ]]; then
        batch_runs
        return
    fi
    if [[ "$pacing_only" == 1 ]]; then
        start_kabar "$meta0" "$work/kabar.log"
        warm "$grpc"
        start_unpaced
        send_runs
        stop_kabar
        pacing_runs
        return
    fi
    "${phone_bench[@]}" | tee -a "$results"

    start_kabar "$meta0" "$work/kabar.log"
    start_unpaced
    run meta-direct-0ms meta-direct "http://$meta0" -c 64
    # kabar's health check is tonic's own health service, as on the bare server: the two differ
    # only by machine noise, which this pair measures (both called without a key: health is
    # open). Ratios divide by kabar's health; kabar's own per-call work shows in verify-invalid (a
    # VerifyOtp refused in validation, no Redis), which with keys on also checks the key.
    # Each is run twice, interleaved, so that drift on a shared machine hits all three.
    run_without_key bare-health health "http://$bare" -c 64 -m 4
    run_without_key health health "http://$grpc" -c 64 -m 4
    run verify-invalid verify-invalid "http://$grpc" -c 64 -m 4
    run_without_key 'bare-health#2' health "http://$bare" -c 64 -m 4
    run_without_key 'health#2' health "http://$grpc" -c 64 -m 4
    run 'verify-invalid#2' verify-invalid "http://$grpc" -c 64 -m 4
    run verify verify "http://$grpc" -c 64 -m 4 --phones "$phones" --meta "http://$meta0"
    send_runs
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

    pacing_runs
    if [[ "$smoke" == 1 ]]; then
        batch_runs
    fi

    echo "{\"label\":\"rss\",\"kabar_peak_rss_kb\":$rss0,\"kabar_200ms_peak_rss_kb\":$rss200,\"kabar_200ms_1024_peak_rss_kb\":$rss1024}" |
        tee -a "$results"
}

machine="$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
shape="${duration}s per scenario, API keys $keys"
if [[ "$batch_only" == 1 ]]; then
    shape="batch runs: $batch_submit_items items submitted, $batch_run_items sent, API keys $keys"
elif [[ "$keys_only" == 1 ]]; then
    shape="${duration}s per scenario, kabar with API keys beside kabar without"
fi
all_results=()
for i in $(seq 1 "$runs"); do
    if [[ "$runs" == 1 ]]; then results="$out/results.jsonl"; else results="$out/results-$i.jsonl"; fi
    all_results+=("$results")
    bench_once
    echo
    echo "== run $i of $runs: $machine, profile $profile, $shape"
    "$loadgen" summarize "$results" | tee "${results%.jsonl}.summary.md"
done
if [[ "$runs" != 1 ]]; then
    echo
    echo "== $runs runs: $machine, profile $profile, $shape"
    "$loadgen" summarize "${all_results[@]}" | tee "$out/spread.md"
fi
