"""Who may call which Triton API: restricted-API flags for the server, headers and TLS for clients.

One module builds both sides, so the header a client sends is the one the server checks.
Triton checks a header per API group: inference needs the API key; the groups that
change or reveal the deployment (model repository, shared memory, statistics, trace,
logging) need the admin key. gRPC clients must prefix the header with
``triton-grpc-protocol-`` (Triton only passes such metadata to the check).
Health and metadata stay open (load balancers probe them). ``loopback_certs`` makes a throwaway
CA and server certificate for servers on 127.0.0.1 (tests, `make serve-edge-cloud`).
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

API_KEY_HEADER = "x-api-key"
ADMIN_KEY_HEADER = "x-admin-key"
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
INFERENCE_APIS = ("inference",)
ADMIN_APIS = ("model-repository", "shared-memory", "statistics", "trace", "logging")
API_KEY_ENV, ADMIN_KEY_ENV = "RTINFER_API_KEY", "RTINFER_ADMIN_KEY"


def read_secret(value: str | None = None, file: str | os.PathLike | None = None, env: str | None = None) -> str:
    """A key from a file (preferred: not in shell history), a value, or an environment variable."""
    if file:
        return Path(file).read_text().strip()
    return value or (os.environ.get(env, "") if env else "")


def _check(key: str) -> str:
    if not key or any(c in key for c in ",:= \t\n") or not key.isprintable():
        raise ValueError("API keys must be non-empty printable strings without ',', ':', '=' or spaces")
    return key


def server_args(api_key: str = "", admin_key: str = "") -> list[str]:
    """tritonserver flags restricting inference to ``api_key`` and the admin APIs to ``admin_key``."""
    args = []
    for apis, header, key in ((INFERENCE_APIS, API_KEY_HEADER, api_key), (ADMIN_APIS, ADMIN_KEY_HEADER, admin_key)):
        if key:
            spec = f"{','.join(apis)}:{header}={_check(key)}"
            args += [f"--http-restricted-api={spec}", f"--grpc-restricted-protocol={spec}"]
    return args


def tls_server_args(cert: str | None, key: str | None, client_ca: str | None = None) -> list[str]:
    """gRPC over TLS (Triton's HTTP endpoint has no TLS: put a TLS proxy in front, or use gRPC).
    ``client_ca`` turns on mutual TLS: clients need a certificate signed by it."""
    if not cert and not key:
        return []
    if not (cert and key):
        raise ValueError("gRPC TLS needs both a server certificate and its key")
    args = [f"--grpc-server-cert={Path(cert).resolve()}", f"--grpc-server-key={Path(key).resolve()}"]
    if client_ca:
        return args + ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={Path(client_ca).resolve()}"]
    return args + ["--grpc-use-ssl=true"]


def flag(name: str, value: str) -> bool:
    """A model parameter switch: "1" on, "0" or empty off; anything else is refused, not guessed."""
    if value not in ("", "0", "1"):
        raise ValueError(f"{name} must be '1' or '0' (or empty), got {value!r}")
    return value == "1"


def loopback_target(url: str) -> bool:
    """Whether a gRPC target ``host:port`` names a loopback address literally (127.0.0.0/8, [::1]).
    Names (``localhost`` included) are not resolved: what they resolve to may change after this check."""
    host, sep, port = url.rpartition(":")
    if not sep or not port.isdigit():
        return False
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_tls(url: str, ca: str | None, insecure_loopback_only: bool = False) -> bool:
    """Refuse a plaintext gRPC channel to the cascade's cloud (``cloud_url``): the API key travels in every
    call's headers, so anyone on the path would read it (and could force ``edge_fallback`` at will).
    ``insecure_loopback_only`` allows plaintext to a loopback address, for development on one host.
    Returns whether the channel is plaintext (the caller says so loudly)."""
    if ca:
        if not Path(ca).is_file():
            raise ValueError(f"cloud_tls_ca {ca} is not a file: TLS to cloud_url {url} needs the CA "
                             "that signs the cloud's certificate")
        return False
    if insecure_loopback_only and loopback_target(url):
        return True
    missing = f"TLS settings missing for cloud_url {url}: set cloud_tls_ca to the CA that signs the cloud's certificate"
    if insecure_loopback_only:
        raise ValueError(f"{missing}; cloud_insecure_loopback_only allows plaintext only for a loopback address "
                         "given literally (127.0.0.1:PORT or [::1]:PORT), not for this one")
    raise ValueError(f"{missing} (without TLS its API key and the answers cross the network in clear, and anyone "
                     "on the path can force edge_fallback). For development on this host only, "
                     "cloud_insecure_loopback_only \"1\" allows plaintext to a loopback address")


def headers(protocol: str, api_key: str = "", admin_key: str = "") -> dict[str, str]:
    """Request headers carrying the keys, named as Triton expects them on ``protocol``."""
    prefix = GRPC_HEADER_PREFIX if protocol == "grpc" else ""
    out = {}
    if api_key:
        out[prefix + API_KEY_HEADER] = api_key
    if admin_key:
        out[prefix + ADMIN_KEY_HEADER] = admin_key
    return out


def grpc_tls_kwargs(ca: str | None = None, cert: str | None = None, key: str | None = None) -> dict:
    """tritonclient.grpc.InferenceServerClient arguments for TLS (file paths; cert+key for mutual TLS)."""
    if not (ca or cert or key):
        return {}
    return {"ssl": True, "root_certificates": ca, "certificate_chain": cert, "private_key": key}


def http_tls_kwargs(ca: str | None = None, cert: str | None = None, key: str | None = None,
                    aio: bool = False) -> dict:
    """tritonclient.http (or .aio) arguments for HTTPS: the gateway terminates TLS (Triton's own
    HTTP endpoint has none). ``ca`` verifies the server; cert+key for mutual TLS."""
    if not (ca or cert or key):
        return {}
    if aio:
        context = ssl.create_default_context(cafile=ca)
        if cert:
            context.load_cert_chain(cert, key)
        return {"ssl": True, "ssl_context": context}
    options = {"ca_certs": ca} if ca else {}
    if cert:
        options.update(certfile=cert, keyfile=key)
    return {"ssl": True, "ssl_options": options}


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def pem_key(key) -> bytes:
    """A private key as unencrypted PKCS#8 PEM (for a key file written 0600 with ``write_private``)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


_pem_key = pem_key  # the old name, for callers that still use it


def throwaway_ca(name: str) -> tuple:
    """(certificate, key) of a one-day CA for loopback trials and tests, never production."""
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
          .public_key(key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(key, hashes.SHA256()))
    return ca, key


def issue(ca, ca_key, subject: str, *extensions) -> tuple:
    """(certificate, key) for ``subject``, signed by ``ca`` for one day; ``extensions``: (extension, critical)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(ca.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(ca_key, hashes.SHA256()), key


def loopback_certs(directory) -> dict:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost signed by it (PEM files ``ca``,
    ``server``, ``server-key``): for servers on loopback (tests, `make serve-edge-cloud`), never production."""
    ca, ca_key = throwaway_ca("rtinfer test CA")
    cert, key = issue(ca, ca_key, "localhost",
                      (x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False),
                      (x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / f"{name}.pem" for name in ("ca", "server", "server-key")}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["server"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private(paths["server-key"], pem_key(key))
    return paths


def write_private(path: Path, data: bytes) -> None:
    """Write a secret owner-only from its first byte: created 0600 whatever the umask (an existing file is
    narrowed before the write), never written first and chmod-ed after (readable by others in between)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o600)
        f.write(data)
