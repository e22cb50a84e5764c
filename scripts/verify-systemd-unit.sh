#!/usr/bin/env bash
# Checks systemd/rowsync.service with `systemd-analyze verify` (syntax, unknown or malformed
# directives, the ExecStart binary) and `systemd-analyze security --offline` (sandbox exposure).
#
# Usage: scripts/verify-systemd-unit.sh [path/to/rowsync]
#   The binary defaults to target/release/rowsync, else target/debug/rowsync. Nothing is built.
#
# verify insists that ExecStart's binary exists, so the unit is checked as a temporary copy whose
# ExecStart points at the given binary; everything else is checked exactly as shipped.
# (EnvironmentFile= is not read by verify, so /etc/rowsync/rowsync.env need not exist.)
#
# Exit status: 0 when the unit is clean (or when systemd-analyze is unavailable and cannot be
# installed: the check is then skipped, with a message), 1 on any warning or error about the unit,
# or when its exposure score is above ROWSYNC_UNIT_MAX_EXPOSURE (default 2.0, on systemd's 0-10
# scale; the shipped unit scores 1.1).
set -euo pipefail
cd "$(dirname "$0")/.."

unit=systemd/rowsync.service
max_exposure=${ROWSYNC_UNIT_MAX_EXPOSURE:-2.0}

binary=${1:-}
if [[ -z $binary ]]; then
    if [[ -x target/release/rowsync ]]; then
        binary=target/release/rowsync
    else
        binary=target/debug/rowsync
    fi
fi
if [[ ! -x $binary ]]; then
    echo "error: $binary is not an executable file; build rowsync first (cargo build)" >&2
    exit 1
fi
binary=$(realpath "$binary")

if ! command -v systemd-analyze >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) -eq 0 ]]; then
        echo "--- installing systemd-analyze (Debian package systemd)"
        export DEBIAN_FRONTEND=noninteractive
        if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd; } \
            >/dev/null 2>&1; then
            echo "warning: apt-get could not install systemd" >&2
        fi
    fi
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "SKIPPED: systemd-analyze is not available and could not be installed" \
        "(needs apt-get and root); $unit was not checked"
    exit 0
fi
echo "--- $(systemd-analyze --version | head -n 1)"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The copy keeps the unit's name: verify derives the unit name from the file name.
copy=$work/rowsync.service
awk -v binary="$binary" '
    /^ExecStart=\/usr\/local\/bin\/rowsync / {
        sub(/^ExecStart=\/usr\/local\/bin\/rowsync/, "ExecStart=\"" binary "\"")
        rewritten++
    }
    { print }
    END { if (rewritten != 1) exit 1 }
' "$unit" >"$copy" || {
    echo "error: expected exactly one 'ExecStart=/usr/local/bin/rowsync ...' line in $unit" >&2
    exit 1
}

# Lines about our unit (they name the file or the unit) are failures; anything else systemd-analyze
# prints comes from the host's own units or the container and is shown but not held against us.
failed=0
report() { # report <step> <status> <stderr file>
    local step=$1 status=$2 output=$3 line
    while IFS= read -r line; do
        if [[ $line == *rowsync.service* ]]; then
            echo "  $step: $line" >&2
            failed=1
        else
            echo "  $step (unrelated, ignored): $line" >&2
        fi
    done <"$output"
    if [[ $status -ne 0 ]]; then
        echo "  $step: exit status $status" >&2
        failed=1
    fi
}

echo "--- systemd-analyze verify $unit (ExecStart=$binary)"
verify_options=(--man=no)
# Since systemd 250: judge only this unit, not the host's units it depends on.
if systemd-analyze --help 2>/dev/null | grep -q -- '--recursive-errors'; then
    verify_options+=(--recursive-errors=no)
fi
status=0
systemd-analyze verify "${verify_options[@]}" "$copy" 2>"$work/verify.err" || status=$?
report verify "$status" "$work/verify.err"
[[ $failed -eq 0 ]] && echo "ok"

echo "--- systemd-analyze security --offline (exposure at most $max_exposure)"
if systemd-analyze --help 2>/dev/null | grep -q -- '--offline'; then
    # --threshold is on a 0-100 scale; the report shows it divided by ten.
    threshold=$(awk -v max="$max_exposure" 'BEGIN { printf "%d", max * 10 + 0.5 }')
    status=0
    systemd-analyze security --offline=true --threshold="$threshold" --no-pager "$copy" \
        >"$work/security.out" 2>"$work/security.err" || status=$?
    grep -E '✗|Overall exposure' "$work/security.out" || true
    if [[ $status -ne 0 && ! -s $work/security.err ]]; then
        echo "  security: exposure above $max_exposure" >&2
        failed=1
    else
        report security "$status" "$work/security.err"
    fi
else
    echo "SKIPPED: this systemd-analyze has no --offline (systemd < 250)"
fi

if [[ $failed -ne 0 ]]; then
    echo "FAILED: $unit has problems (above)" >&2
    exit 1
fi
echo "OK: $unit"
