"""Sidecar of the Triton pods: Secret files -> 0600 key files owned by Triton's user.

    python3 key_sync.py --dst DIR [--interval S] [--once] SRC=NAME ...

The stages refuse a keyring, server-internal key or signing key that group or others can read,
and Kubernetes gives Secret volumes group read as soon as the pod has an fsGroup (which the audit
volume needs). So the Secrets are mounted elsewhere and copied here, into an in-memory emptyDir:
written to a temp file (0600), fsynced and renamed into place, only when the content changed. A
Secret updated in the cluster reaches the pod's volume within the kubelet's sync period, and this
copy within --interval, and the stages reload a changed keyring or internal key within
keyring_check_s: rotation without a restart, as outside Kubernetes. After the first complete pass
it creates DIR/.ready (the sidecar's startup probe), so Triton starts only with every key in place.
A source that cannot be read keeps the previous copy and is reported, every pass.
"""
import argparse
import os
import sys
import time
from pathlib import Path


def sync_one(src: Path, dst: Path) -> bool:
    data = src.read_bytes()
    try:
        if dst.read_bytes() == data and (dst.stat().st_mode & 0o777) == 0o600:
            return False
    except FileNotFoundError:
        pass
    tmp = dst.with_name(f".{dst.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dst)
    return True


def sync_all(pairs, dst_dir: Path) -> bool:
    ok = True
    for src, name in pairs:
        try:
            if sync_one(src, dst_dir / name):
                print(f"key_sync: {name} updated from {src}", flush=True)
        except OSError as exc:
            ok = False
            print(f"key_sync: cannot copy {src} to {name}: {exc.__class__.__name__}", file=sys.stderr, flush=True)
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dst", required=True)
    p.add_argument("--interval", type=float, default=5.0)
    p.add_argument("--once", action="store_true")
    p.add_argument("pairs", nargs="+", metavar="SRC=NAME")
    args = p.parse_args(argv)
    pairs = []
    for item in args.pairs:
        src, sep, name = item.partition("=")
        if not sep or not name or "/" in name or name.startswith("."):
            p.error(f"bad pair {item!r}: SRC=NAME with a plain file name")
        pairs.append((Path(src), name))
    dst_dir = Path(args.dst)
    dst_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ready = dst_dir / ".ready"
    while True:
        if sync_all(pairs, dst_dir) and not ready.exists():
            ready.touch(mode=0o600)
        if args.once:
            return 0 if ready.exists() else 1
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
