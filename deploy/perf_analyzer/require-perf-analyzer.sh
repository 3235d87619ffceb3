#!/bin/sh
# Make sure NVIDIA's perf_analyzer runs here (make perf-analyzer, tests/test_perf_analyzer.py), from pinned wheels,
# beside the project rather than in it: bin/perf_analyzer of tritonclient 2.50.0 and libcudart.so.12 of
# nvidia-cuda-runtime-cu12 (requirements.txt, hashes checked) unpacked into build/perf_analyzer/tool/ (or $1),
# and Debian's libb64-0d, installed with apt-get when missing and we are root, otherwise stop saying what to do.
# Prints the directory: run <dir>/bin/perf_analyzer with LD_LIBRARY_PATH=<dir>/lib.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
dest=${1:-$root/build/perf_analyzer/tool}
python=${PYTHON:-$root/.venv/bin/python}
bin=$dest/bin/perf_analyzer
lib=$dest/lib

if ! ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "perf_analyzer: installing libb64-0d (apt-get)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libb64-0d >/dev/null
    else
        echo "perf_analyzer: it needs libb64.so.0d, which is not installed." >&2
        echo "perf_analyzer: install it as root (Debian/Ubuntu: sudo apt-get install libb64-0d), then run make again." >&2
        exit 1
    fi
fi

if [ ! -x "$bin" ] || [ ! -f "$lib/libcudart.so.12" ] || ! cmp -s "$here/requirements.txt" "$dest/requirements.txt"; then
    echo "perf_analyzer: unpacking the pinned wheels into $dest" >&2
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    "$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --require-hashes \
        -r "$here/requirements.txt" -d "$tmp/wheels"
    "$python" - "$tmp/wheels" "$dest" <<'PY'
import os
import sys
import zipfile
from pathlib import Path

wheels, dest = Path(sys.argv[1]), Path(sys.argv[2])
wanted = {"tritonclient-2.50.0.data/data/bin/perf_analyzer": dest / "bin" / "perf_analyzer",
          "nvidia/cuda_runtime/lib/libcudart.so.12": dest / "lib" / "libcudart.so.12"}
for wheel in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name in wanted:
                target = wanted.pop(name)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{os.getpid()}")
                tmp.write_bytes(z.read(name))
                tmp.chmod(0o755)
                os.replace(tmp, target)
if wanted:
    sys.exit(f"perf_analyzer: not in the pinned wheels: {', '.join(wanted)}")
PY
    cp "$here/requirements.txt" "$dest/requirements.txt"
fi

if ! LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$bin" --version 2>&1 | grep -q "Perf Analyzer Version"; then
    echo "perf_analyzer: $bin does not run here:" >&2
    LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$bin" --version >&2 || true
    exit 1
fi
echo "$dest"
