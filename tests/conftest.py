"""Shared fixtures: keys, and one real tritonserver per test session on free loopback ports.

``model_repository_with`` (``rtinfer.launch.server.repository_with``) builds a copy of the repository for servers
that need other stage parameters (rotation size, replay window, ...): the stages are copied with their
``parameters`` changed, every other model is a symlink to the real one.

Unit or integration (markers in pyproject.toml): a test is marked ``integration`` here, from its source, when it
starts a server or needs what ``make engines`` built (``INTEGRATION_NAMES``, ``LAUNCHERS``); ``make test-unit`` runs
the others, and one of those that starts a server anyway fails (``_refuse_servers``).
"""
from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import textwrap
import time
from functools import cache
from pathlib import Path

import pytest

from rtinfer import checkpoint, keyring
from rtinfer.launch.server import ROOT, TritonServer, repository_with

REPO = ROOT / "model_repository"
model_repository_with = repository_with  # tests import it from here


def settled(read, timeout: float = 10.0):
    """``read()`` once two reads 0.1 s apart agree (or at ``timeout``): postprocess and the cascade export
    their metrics after they have answered, so a scrape right after an answer may come too early."""
    last, deadline = read(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = read()
        if now == last:
            break
        last = now
    return last


def require_model():
    if not (REPO / "classifier_onnx" / "1" / "model.onnx").exists():
        pytest.fail("the CPU model is not built: run `make engines` (make test does it first)")


BOUND_KEY_ID, BOUND_CLIENTS = "bound-key", ("acme", "acme-batch")


@pytest.fixture(scope="session")
def keyring_path(tmp_path_factory) -> Path:
    """k1, k2 have no client list (as keyrings written before it: any id that no key lists); BOUND_KEY_ID may
    claim only BOUND_CLIENTS (rtinfer.keyring). Written first, it is never the newest key."""
    return keyring.write_new(tmp_path_factory.mktemp("keys") / "keyring.json", key_ids=(BOUND_KEY_ID, "k1", "k2"),
                             clients={BOUND_KEY_ID: BOUND_CLIENTS})


@pytest.fixture(scope="session")
def keys(keyring_path) -> keyring.Keyring:
    return keyring.Keyring.load(keyring_path)


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory) -> tuple[Path, Path]:
    """Ed25519 audit signing key (private, public)."""
    return checkpoint.keygen(tmp_path_factory.mktemp("signing") / "audit-signing.pem")


@pytest.fixture(scope="session")
def audit_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audit")


@pytest.fixture(scope="session")
def server(keyring_path, audit_dir, signing_key, tmp_path_factory):
    """The pipeline on the embedded server; stopped at the end of the session."""
    require_model()
    work = tmp_path_factory.mktemp("triton")
    with TritonServer(keyring=str(keyring_path), audit_dir=str(audit_dir), audit_signing_key=str(signing_key[0]),
                      workdir=work) as srv:
        yield srv


GATED_API_KEY, GATED_ADMIN_KEY = "gw-infer-5c0e91aa", "gw-admin-3b7d20f4"


def require_haproxy():
    from rtinfer.launch.gateway import GatewayUnavailable, haproxy_binary
    try:
        haproxy_binary()
    except GatewayUnavailable as exc:  # make test installs it first (make haproxy): a failure, not a skip
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def gated_triton(keyring_path, signing_key, tmp_path_factory):
    """The pipeline on loopback, locked down as behind the gateway (inference and admin keys),
    with its own audit directory (``.audit_dir``); the gateway tests put gateways in front of it."""
    require_model()
    audit_dir = tmp_path_factory.mktemp("audit-gated")
    with TritonServer(keyring=str(keyring_path), audit_dir=str(audit_dir), audit_signing_key=str(signing_key[0]),
                      api_key=GATED_API_KEY, admin_key=GATED_ADMIN_KEY,
                      workdir=tmp_path_factory.mktemp("triton-gated")) as srv:
        srv.audit_dir = audit_dir
        yield srv


# A test is `integration` when its body, a fixture it uses, or a function or module-level name of its module,
# conftest.py or helpers.py that they use (followed through), names one of these or runs one of LAUNCHERS.
INTEGRATION_NAMES = frozenset({
    # servers: tritonserver, the gateway (HAProxy), Redis, Prometheus
    "TritonServer", "Gateway", "RedisServer", "Prometheus", "start_server", "require_haproxy", "redis_binary",
    # what `make engines` built
    "require_model", "BUILD", "SOURCE_DIR", "PRUNED_DIR", "CPU_DIR", "FP16_DIR", "INT8_TRT_DIR", "REPORT_DIR",
    "IMAGES_DIR", "CPU_MODEL_DIR",
})
# Subprocesses that start servers or builds: python -m of a launcher or of the build, and make (unless asked for
# help or a dry run).
LAUNCHERS = re.compile(r"rtinfer\.(launch\.)?(gateway|server|edge_cloud|observe|redis_server|prometheus)"
                       r"|loadtest\.(run|bench|fleet_bench|gateway_overhead)|clients\.(demo|evaluate|cascade_curve)"
                       r"|build_engines(\.bench)?")
RUNS_NOTHING = {"-n", "--dry-run", "--just-print", "help", "-h", "--help"}
SERVER_BINARIES = {"tritonserver", "haproxy", "redis-server", "prometheus"}
TESTS = Path(__file__).resolve().parent


def _built_path(node: ast.BinOp) -> bool:
    """``ROOT / "build" / "engines"`` or ``REPO / "classifier_..." / "1"``: what `make engines` built (a path from
    the checkout's ROOT or REPO, not from a test's own tmp_path)."""
    parts = []
    while isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        parts.insert(0, node.right.value if isinstance(node.right, ast.Constant) else None)
        node = node.left
    if not {"ROOT", "REPO"} & {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}:
        return False
    return any((a, b) == ("build", "engines") or (isinstance(a, str) and a.startswith("classifier") and b == "1")
               for a, b in zip(parts, parts[1:]))


def _launches(argv: list[str]) -> bool:
    """Whether this command line starts a server (not a check such as ``haproxy -c``) or a build."""
    name = os.path.basename(argv[0]) if argv else ""
    if name in SERVER_BINARIES:
        return not {"-c", "-v", "--version"} & set(argv[1:])
    module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else ""
    return (name == "make" or bool(LAUNCHERS.fullmatch(module))) and not RUNS_NOTHING & set(argv[1:])


def _argv(node: ast.List | ast.Tuple) -> list[str]:
    """A literal command line's strings ("" for what is computed; a server for haproxy_binary() and the like)."""
    def word(e):
        if isinstance(e, ast.Constant) and isinstance(e.value, str):
            return e.value
        if isinstance(e, ast.Call):
            called = e.func.id if isinstance(e.func, ast.Name) else getattr(e.func, "attr", "")
            return {"haproxy_binary": "haproxy", "redis_binary": "redis-server"}.get(called, "")
        return ""
    return [word(e) for e in node.elts]


def _names(node) -> set[str]:
    """Names and attributes that ``node`` uses ("<launcher>" for an argv that runs one, "BUILD" for a path into the
    build)."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, (ast.List, ast.Tuple)) and _launches(_argv(n)):
            out.add("<launcher>")
        elif isinstance(n, ast.BinOp) and _built_path(n):
            out.add("BUILD")
    return out


@cache
def _integration_names(module_file: str) -> frozenset[str]:
    """INTEGRATION_NAMES and the functions, classes and module-level names of this module, conftest.py and
    helpers.py that use one of them (to a fixed point). Fixtures are not called by name: a test's fixtures are
    looked at one by one (_is_integration)."""
    uses: dict[str, set[str]] = {}
    for f in {Path(module_file), TESTS / "conftest.py", TESTS / "helpers.py"}:
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if not any("fixture" in _names(d) for d in getattr(node, "decorator_list", ())):
                    uses.setdefault(node.name, set()).update(_names(node))
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, (ast.Name, ast.Tuple)):
                        for name in (n.id for n in ast.walk(t) if isinstance(n, ast.Name)):
                            uses.setdefault(name, set()).update(_names(node.value))
    found = set(INTEGRATION_NAMES) | {"<launcher>"}
    while grown := {name for name, used in uses.items() if name not in found and used & found}:
        found |= grown
    return frozenset(found)


def _is_integration(item) -> bool:
    funcs = [item.function] + [d.func for name in item.fixturenames
                               for d in item._fixtureinfo.name2fixturedefs.get(name, ())]
    names = _integration_names(str(item.path))
    for func in funcs:
        try:
            src, path = inspect.getsource(func), Path(inspect.getfile(func)).resolve()
        except (OSError, TypeError):
            continue
        if path.parent == TESTS and _names(ast.parse(textwrap.dedent(src))) & names:
            return True
    return False


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("integration") is None and _is_integration(item):
            item.add_marker(pytest.mark.integration)


_unit_test_running = [False]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _unit_test_running[0] = item.get_closest_marker("integration") is None


_popen_init = subprocess.Popen.__init__


def _refuse_servers(self, args, *a, **kw):
    """A unit test (and its fixtures) may run tools, not servers or builds: mark it integration instead."""
    if _unit_test_running[0]:
        argv = [str(x) for x in ([args] if isinstance(args, (str, bytes, os.PathLike)) else args)]
        if _launches(argv):
            raise AssertionError(f"a unit test started {' '.join(argv[:3])}: it is an integration test "
                                 f"(tests/conftest.py INTEGRATION_NAMES, or mark it @pytest.mark.integration)")
    _popen_init(self, args, *a, **kw)


subprocess.Popen.__init__ = _refuse_servers
