#!/bin/sh
# Make sure Prometheus 2.x and promtool are installed (the monitoring tests and `make observe` run
# them): install Debian's `prometheus` with apt-get when missing and we can (root), otherwise stop
# saying what to do. The package's service is not started (policy-rc.d / no systemd is fine).
set -eu
find_bin() {
    for c in "$(command -v "$1" 2>/dev/null || true)" "/usr/bin/$1" "/usr/local/bin/$1"; do
        if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
    done
    return 1
}
if ! find_bin prometheus >/dev/null || ! find_bin promtool >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "monitoring: installing prometheus (apt-get)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    else
        echo "monitoring: Prometheus (2.x, with promtool) is required and is not installed." >&2
        echo "monitoring: install it as root (Debian/Ubuntu: sudo apt-get install prometheus), then run make again." >&2
        exit 1
    fi
fi
prom=$(find_bin prometheus); tool=$(find_bin promtool)
version=$("$tool" --version 2>&1 | sed -n 's/^promtool, version \([0-9]*\)\..*/\1/p' | head -n1)
if [ "${version:-0}" != 2 ]; then
    echo "monitoring: $tool is not promtool 2.x (the rule tests use 2.x syntax)." >&2
    exit 1
fi
echo "monitoring: $prom, $tool ($("$tool" --version 2>&1 | head -n1))"
