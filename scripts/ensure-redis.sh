# Sourced by scripts/test.sh and scripts/bench.sh: makes sure a redis-server binary exists.
# Installs it with apt-get when missing and running as root; otherwise says how and exits 1.
# (No Redis service needs to run: the tests and the benchmark start private servers.)
if ! command -v redis-server >/dev/null 2>&1; then
    if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "kabar: redis-server not found; installing it with apt-get" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update
        apt-get install -y redis-server
    else
        echo "kabar: redis-server not found on PATH." >&2
        echo "The integration tests start their own redis-server; install the binary:" >&2
        echo "    Debian/Ubuntu:  sudo apt-get install redis-server" >&2
        echo "    macOS:          brew install redis" >&2
        echo "(A running Redis service is not needed; each test starts a private one.)" >&2
        exit 1
    fi
    if ! command -v redis-server >/dev/null 2>&1; then
        echo "kabar: redis-server is still not on PATH after apt-get install" >&2
        exit 1
    fi
fi
