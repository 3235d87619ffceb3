"""Launch the `tritonserver` binary shipped in the nvidia-pytriton wheel on this model repository.

We use only the wheel's binary and Python backend, not PyTriton's serving API.
The launcher assembles a backend directory (the Python backend, the stub for the
running interpreter, and our Python-based `onnxruntime` backend), sets the
environment the stub needs, starts the server with explicit model control, and
waits until the models are ready. ``python -m rtinfer.launch.server`` serves until Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytriton

from rtinfer import access
from rtinfer.launch.process import die_with_parent, free_port, stop_process

ROOT = Path(__file__).resolve().parents[2]
# Parameters naming the models a BLS model calls: explicit model control loads an ensemble's steps,
# not these, so the launcher loads them too (the cascade's cloud_model only without a remote cloud).
BLS_PARAMS = ("edge_model", "cloud_model")
# A replica's id in a fleet (its audit records name it; the gateway names its server by it).
REPLICA_ID_ENV = "RTINFER_REPLICA_ID"
WHEEL = Path(pytriton.__file__).resolve().parent / "tritonserver"
LIBS = WHEEL.parent.parent / "nvidia_pytriton.libs"


def has_gpu() -> bool:
    return Path("/dev/nvidia0").exists() and shutil.which("nvidia-smi") is not None


def _install(src: Path, dst: Path) -> None:
    """Copy beside and rename over: a running server's stub keeps its old inode ("Text file busy" otherwise)."""
    if dst.exists() and dst.read_bytes() == src.read_bytes():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def assemble_backends(target: Path) -> Path:
    """backends/python (+ stub for this Python) and backends/onnxruntime/model.py, refreshed each start."""
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        _install(WHEEL / "backends" / "python" / name, target / "python" / name)
    stub = WHEEL / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
    _install(stub / "triton_python_backend_stub", target / "python" / "triton_python_backend_stub")
    _install(ROOT / "backends" / "onnxruntime" / "model.py", target / "onnxruntime" / "model.py")
    return target


def server_env(extra: dict | None = None) -> dict:
    """PATH with this venv's bin first (the stub finds packages through python3 on PATH);
    the wheel's libs, and the base interpreter's lib dir first so the stub's libpython
    matches the standard library it imports."""
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    libdirs = [sysconfig.get_config_var("LIBDIR") or "", str(LIBS), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(d for d in libdirs if d)
    # The stages import rtinfer from this checkout, whatever checkout the venv was installed from.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


class Endpoints:
    """Addresses clients use, from ``host`` and the three ports (the server's, or the gateway's in front)."""
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"


def model_params(repo: Path, model: str, config_name: str | None) -> dict[str, str]:
    """The string parameters of the config this host loads for ``model`` ({} if it has none)."""
    chosen = repo / model / "configs" / f"{config_name}.pbtxt" if config_name else None
    path = chosen if chosen is not None and chosen.exists() else repo / model / "config.pbtxt"
    if not path.exists():
        return {}
    return dict(re.findall(r'\{ key: "([^"]+)" value: \{ string_value: "([^"]*)" \} \}', path.read_text()))


def with_targets(models, repo: Path = ROOT / "model_repository", config_name: str | None = None) -> list[str]:
    """The models and those they call through BLS (their ``BLS_PARAMS``), each once, in order."""
    out = []
    for m in models:
        params = model_params(Path(repo), m, config_name)
        called = [params[k] for k in BLS_PARAMS
                  if params.get(k) and not (k == "cloud_model" and params.get("cloud_url"))]
        for name in (m, *called):
            if name not in out:
                out.append(name)
    return out


class TritonServer(Endpoints):
    """A running tritonserver; a context manager that always stops it."""

    def __init__(self, model_repository: str | os.PathLike = ROOT / "model_repository", *,
                 models=("pipeline",), http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
                 keyring: str | None = None, audit_dir: str | None = None, config_name: str | None = "auto",
                 audit_signing_key: str | None = None, api_key: str = "", admin_key: str = "",
                 tls_cert: str | None = None, tls_key: str | None = None, tls_client_ca: str | None = None,
                 host: str = "127.0.0.1", extra_args=(), env: dict | None = None, replica_id: str | None = None,
                 workdir: str | os.PathLike = ROOT / "build" / "triton", log_file: str | None = None):
        self.model_repository = Path(model_repository).resolve()
        self.config_name = ("cpu" if not has_gpu() else None) if config_name == "auto" else config_name
        self.models = with_targets(models, self.model_repository, self.config_name)
        self.host = host
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.api_key, self.admin_key = api_key, admin_key
        self.tls = bool(tls_cert or tls_key)
        # Secrets end up in tritonserver's argv (its only way to take them): readable in /proc by
        # other users of this host unless /proc is mounted hidepid. Keep them out of our logs.
        self.extra_args = (access.server_args(api_key, admin_key)
                           + access.tls_server_args(tls_cert, tls_key, tls_client_ca) + list(extra_args))
        self.workdir = Path(workdir)
        self.log_file = Path(log_file) if log_file else self.workdir / f"server-{self.http_port}.log"
        self.env = dict(env or {})
        if keyring:
            self.env["RTINFER_KEYRING"] = str(Path(keyring).resolve())
        if audit_dir:
            self.env["RTINFER_AUDIT_DIR"] = str(Path(audit_dir).resolve())
        if audit_signing_key:
            self.env["RTINFER_AUDIT_SIGNING_KEY"] = str(Path(audit_signing_key).resolve())
        self.replica_id = replica_id
        if replica_id:
            self.env[REPLICA_ID_ENV] = replica_id
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        backends = assemble_backends(self.workdir / "backends")
        cmd = [str(WHEEL / "bin" / "tritonserver"),
               f"--model-repository={self.model_repository}",
               f"--backend-directory={backends}",
               f"--cache-directory={WHEEL / 'caches'}",
               "--model-control-mode=explicit",
               *[f"--load-model={m}" for m in self.models],
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
               "--allow-metrics=true", "--log-verbose=0"]
        if self.config_name:
            cmd.append(f"--model-config-name={self.config_name}")
        return cmd + self.extra_args

    def start(self, timeout: float = 120.0) -> "TritonServer":
        """Start (or start again, after stop or kill: same ports, audit directory and log, appended)."""
        if self.running():
            raise RuntimeError("tritonserver is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab" if self.proc is not None else "wb")  # a restart appends
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     env=server_env(self.env), start_new_session=True,
                                     preexec_fn=die_with_parent)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def ready(self) -> bool:
        try:
            for model in self.models:
                url = f"http://{self.host}:{self.http_port}/v2/models/{model}/ready"
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status != 200:
                        return False
            return True
        except OSError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        stop_process(self.proc, signal.SIGINT, timeout)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, timeout: float = 15.0) -> None:
        """SIGKILL the server and its backend stubs (its process group): a crash, for fault tests."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # the stubs are reaped by init; wait until none is left
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def repository_with(target: Path, overrides: dict[str, dict[str, str]], repo: Path | None = None) -> Path:
    """A repository in ``target`` where model -> {parameter: value} replaces those parameter values: the
    models named are copied with their ``parameters`` changed, every other one is a symlink (tests,
    measurements that compare settings such as the cascade's threshold)."""
    target.mkdir(parents=True, exist_ok=True)
    for model in (repo or ROOT / "model_repository").iterdir():
        if not model.is_dir():
            continue
        if model.name not in overrides:
            (target / model.name).symlink_to(model, target_is_directory=True)
            continue
        shutil.copytree(model, target / model.name, ignore=shutil.ignore_patterns("__pycache__"))
        for cfg in [target / model.name / "config.pbtxt", *(target / model.name / "configs").glob("*.pbtxt")]:
            text = cfg.read_text()
            for key, value in overrides[model.name].items():
                pattern = re.compile(r'(\{ key: "%s" value: \{ string_value: ")[^"]*(" \} \})' % re.escape(key))
                text, n = pattern.subn(lambda m: m.group(1) + value + m.group(2), text)
                if n != 1:
                    raise ValueError(f"parameter {key} not found once in {cfg}")
            cfg.write_text(text)
    return target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rtinfer.launch.server", description=__doc__)
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--model", action="append", help="model to load (default: pipeline; its steps load with it)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--keyring")
    p.add_argument("--audit-dir")
    p.add_argument("--config-name", default="auto", help="'auto' = cpu when no GPU is present; '' = config.pbtxt")
    p.add_argument("--audit-signing-key", help="Ed25519 key (PEM, 0600) for signed audit checkpoints")
    p.add_argument("--api-key-file", help=f"inference needs this key (header {access.API_KEY_HEADER}); "
                   f"or ${access.API_KEY_ENV}")
    p.add_argument("--admin-key-file", help="model-repository, shared-memory, statistics, trace and logging need "
                   f"this key (header {access.ADMIN_KEY_HEADER}); or ${access.ADMIN_KEY_ENV}")
    p.add_argument("--tls-cert", help="gRPC TLS: server certificate (PEM)")
    p.add_argument("--tls-key", help="gRPC TLS: server private key (PEM)")
    p.add_argument("--tls-client-ca", help="gRPC mutual TLS: CA that signs client certificates")
    args, extra = p.parse_known_args(argv)
    server = TritonServer(args.model_repository, models=args.model or ["pipeline"], host=args.host,
                          http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                          keyring=args.keyring, audit_dir=args.audit_dir, config_name=args.config_name or None,
                          audit_signing_key=args.audit_signing_key,
                          api_key=access.read_secret(file=args.api_key_file, env=access.API_KEY_ENV),
                          admin_key=access.read_secret(file=args.admin_key_file, env=access.ADMIN_KEY_ENV),
                          tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                          extra_args=extra)
    server.start()
    print(f"tritonserver ready: HTTP {server.http_url}  gRPC {server.grpc_url}"
          f"{' (TLS)' if server.tls else ''}  metrics {server.metrics_url}"
          f"  config {server.config_name or 'config.pbtxt'}  log {server.log_file}"
          f"  inference key {'required' if server.api_key else 'OFF'}"
          f"  admin key {'required' if server.admin_key else 'OFF'}", flush=True)
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
