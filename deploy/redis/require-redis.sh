#!/bin/sh
# Make sure redis-server >= 7 is installed (the fleet's shared replay store, and its tests): install it
# with apt-get when missing and we can (root on Debian/Ubuntu), otherwise stop saying what to do.
# TLS (rediss://) needs a build with TLS: Debian's redis-server 7 has it.
set -eu
find_redis() {
    for c in "${RTINFER_REDIS_SERVER:-}" "$(command -v redis-server 2>/dev/null || true)" /usr/bin/redis-server /usr/local/bin/redis-server; do
        if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
    done
    return 1
}
if ! bin=$(find_redis); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "redis: installing redis-server (apt-get)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
        bin=$(find_redis)
    else
        echo "redis: redis-server 7 or newer is required and is not installed." >&2
        echo "redis: install it as root (Debian/Ubuntu: sudo apt-get install redis-server), or set RTINFER_REDIS_SERVER=/path/to/redis-server, then run make again." >&2
        exit 1
    fi
fi
version=$("$bin" --version | sed -n 's/.* v=\([0-9]*\)\.\([0-9]*\).*/\1.\2/p')
major=${version%%.*}
if [ -z "$version" ] || [ "$major" -lt 7 ]; then
    echo "redis: $bin is redis-server '${version:-unknown}'; 7 or newer is required (ACL selectors, TLS)." >&2
    exit 1
fi
echo "redis: $bin (redis-server $version)"
