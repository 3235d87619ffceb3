"""The parsers the gateway's gRPC reader is proved against (tests/test_gateway_differential.py).

- ``CppParser``: C++ libprotobuf's generated code, as Triton's gRPC front end runs it. protoc
  generates it from the descriptors that tritonclient ships (no .proto file needed), g++ builds
  ``tests/oracle/parse_request.cc`` against the system libprotobuf once per source change
  (``build/protobuf-oracle/``), and one process parses a whole batch.
- ``upb_parse``: the Python ``protobuf`` package (upb), once through tritonclient's generated
  classes and once through classes made from a fresh descriptor pool.
"""
from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from tritonclient.grpc import model_config_pb2, service_pb2

ROOT = Path(__file__).resolve().parent.parent
SOURCE = Path(__file__).resolve().parent / "oracle" / "parse_request.cc"
KINDS = {"ModelInfer": 0, "ModelConfig": 1, "ServerLive": 2}
MESSAGES = {"ModelInfer": "ModelInferRequest", "ModelConfig": "ModelConfigRequest", "ServerLive": "ServerLiveRequest"}


class OracleUnavailable(RuntimeError):
    """No C++ toolchain or libprotobuf headers: `make test` installs them (deploy/... require script)."""


def descriptor_set() -> bytes:
    fds = descriptor_pb2.FileDescriptorSet()
    for fd in (model_config_pb2.DESCRIPTOR, service_pb2.DESCRIPTOR):
        fd.CopyToProto(fds.file.add())
    return fds.SerializeToString()


def build(out_dir: Path = ROOT / "build" / "protobuf-oracle") -> Path:
    """The oracle binary, built when missing or when its inputs changed."""
    for tool in ("protoc", "g++"):
        if shutil.which(tool) is None:
            raise OracleUnavailable(f"{tool} is not installed: run `make protobuf-oracle` (apt-get install "
                                    "protobuf-compiler libprotobuf-dev g++ as root)")
    desc = descriptor_set()
    version = subprocess.run(["protoc", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    digest = hashlib.sha256(desc + SOURCE.read_bytes() + version.encode()).hexdigest()[:16]
    binary = out_dir / f"parse_request-{digest}"
    if binary.exists():
        return binary
    work = out_dir / f"src-{digest}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "descriptors.pb").write_bytes(desc)
    subprocess.run(["protoc", f"--descriptor_set_in={work / 'descriptors.pb'}", f"--cpp_out={work}",
                    "model_config.proto", "grpc_service.proto"], check=True, cwd=work)
    tmp = work / "parse_request"
    subprocess.run(["g++", "-O1", "-std=c++17", "-I", str(work), str(SOURCE), str(work / "grpc_service.pb.cc"),
                    str(work / "model_config.pb.cc"), "-o", str(tmp), "-lprotobuf", "-pthread"], check=True)
    tmp.replace(binary)
    return binary


class CppParser:
    """Parses batches with the built oracle: per body, None (parse failed) or the model name (bytes)."""

    def __init__(self):
        self.binary = build()

    def parse(self, rpc: str, bodies: list[bytes]) -> list[bytes | None]:
        kind = KINDS[rpc]
        data = b"".join(struct.pack("<BI", kind, len(b)) + b for b in bodies)
        out = subprocess.run([str(self.binary)], input=data, capture_output=True, check=True).stdout.decode()
        lines = out.splitlines()
        assert len(lines) == len(bodies), (len(lines), len(bodies))
        results = []
        for line in lines:
            if line == "fail":
                results.append(None)
            else:
                name = line[3:]
                results.append(b"" if name == "-" else bytes.fromhex(name))
        return results


def _fresh_classes():
    pool = descriptor_pool.DescriptorPool()
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set())
    for f in fds.file:
        pool.Add(f)
    return {rpc: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{name}"))
            for rpc, name in MESSAGES.items()}


_FRESH = _fresh_classes()


def upb_parse(rpc: str, body: bytes) -> list[bytes | None]:
    """[tritonclient's service_pb2, a fresh pool's class]: None (parse failed) or the model name."""
    out = []
    for cls in (getattr(service_pb2, MESSAGES[rpc]), _FRESH[rpc]):
        try:
            m = cls.FromString(body)
        except Exception:  # noqa: BLE001 - a parse failure (DecodeError; nothing else is expected)
            out.append(None)
            continue
        name = m.model_name if rpc == "ModelInfer" else (m.name if rpc == "ModelConfig" else "")
        out.append(name.encode())
    return out
