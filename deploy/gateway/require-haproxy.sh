#!/bin/sh
# Make sure HAProxy >= 2.6 with Lua is installed (the gateway needs it): install it with
# apt-get when missing and we can (root on Debian/Ubuntu), otherwise stop saying what to do.
set -eu
find_haproxy() {
    for c in "${RTINFER_HAPROXY:-}" "$(command -v haproxy 2>/dev/null || true)" /usr/sbin/haproxy /usr/local/sbin/haproxy; do
        if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
    done
    return 1
}
if ! bin=$(find_haproxy); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "gateway: installing haproxy (apt-get)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null
        bin=$(find_haproxy)
    else
        echo "gateway: HAProxy 2.6+ with Lua is required and is not installed." >&2
        echo "gateway: install it as root (Debian/Ubuntu: sudo apt-get install haproxy), or set RTINFER_HAPROXY=/path/to/haproxy, then run make again." >&2
        exit 1
    fi
fi
info=$("$bin" -vv 2>&1)
version=$(echo "$info" | sed -n 's/^HAProxy version \([0-9]*\.[0-9]*\).*/\1/p' | head -n1)
major=${version%%.*}; minor=${version#*.}
if [ -z "$version" ] || [ "$major" -lt 2 ] || { [ "$major" -eq 2 ] && [ "$minor" -lt 6 ]; }; then
    echo "gateway: $bin is HAProxy '${version:-unknown}'; 2.6 or newer is required." >&2
    exit 1
fi
if ! echo "$info" | grep -q "Built with Lua"; then
    echo "gateway: $bin was built without Lua; the gateway's policy is a Lua script." >&2
    exit 1
fi
echo "gateway: $bin (HAProxy $version, Lua)"
