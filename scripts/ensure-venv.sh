# shellcheck shell=bash
# Sourced by scripts/check-deploy.sh and scripts/check-clients.sh (from the repository root):
# a Python virtualenv under target/venv/ with exactly the pinned packages, installed from PyPI
# on the first run and reused while the pins and the Python stay the same.
#
#   ensure_venv NAME PACKAGE==VERSION...    # then "$VENV/bin/..." are its programs
#
# Needs python3 with its venv module and pip; says how to get them and exits 1 otherwise.
ensure_venv() {
    local name=$1 stamp want
    shift
    VENV="$PWD/target/venv/$name"
    stamp="$VENV/.kabar-packages"
    if ! command -v python3 >/dev/null 2>&1; then
        echo "kabar: python3 not found on PATH; it is needed for $name's tools ($*)." >&2
        echo "    Debian/Ubuntu:  sudo apt-get install python3 python3-venv python3-pip" >&2
        exit 1
    fi
    want="$(python3 --version 2>&1) $*"
    if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        echo "kabar: using the virtualenv $VENV ($*)" >&2
        return 0
    fi
    echo "kabar: making the virtualenv $VENV ($*)" >&2
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    if ! python3 -m venv "$VENV" >&2 || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        rm -rf "$VENV"
        echo "kabar: python3 cannot make a virtualenv with pip ($(python3 --version 2>&1))." >&2
        echo "    Debian/Ubuntu:  sudo apt-get install python3-venv python3-pip" >&2
        exit 1
    fi
    if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "$@" >&2
    then
        rm -rf "$VENV"
        echo "kabar: pip could not install $* from PyPI (is the package index reachable?)." >&2
        exit 1
    fi
    # Written last: an interrupted install is made again on the next run.
    printf '%s' "$want" >"$stamp"
}
