"""Issue a self-signed CA and the webhook's serving certificate: pure functions returning PEM."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.errors import CertsError

KeyType = Literal["ec", "rsa"]
KEY_TYPES: tuple[KeyType, ...] = get_args(KeyType)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

CA_FILE = "ca.crt"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"

DEFAULT_DAYS = 365
# The leaf must never outlive its issuer; the margin also covers a CA kept in the trust bundle
# for a while after a renewal.
CA_EXTRA_LIFETIME = datetime.timedelta(days=30)
# The API server's clock may lag ours; a certificate valid from "now" could be rejected as not
# yet valid for the first seconds.
CLOCK_SKEW = datetime.timedelta(minutes=5)

# A Service name is a DNS-1035 label, a namespace a DNS-1123 label; both become DNS names here.
_SERVICE_RE = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_NAMESPACE_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_MAX_LABEL = 63


@dataclass(frozen=True)
class IssuedCertificate:
    """PEM bytes: the CA certificate, the serving certificate and its private key (PKCS#8)."""

    ca_crt: bytes
    tls_crt: bytes
    tls_key: bytes


def service_dns_names(service: str, namespace: str) -> list[str]:
    """Every name the API server (or a client in the cluster) may use to reach the Service."""
    _check_label(service, pattern=_SERVICE_RE, what="service name")
    _check_label(namespace, pattern=_NAMESPACE_RE, what="namespace")
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


def parse_ip(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise CertsError(
            f"{text!r} is not an IP address (expected e.g. 10.0.0.7 or fd00::7)"
        ) from None


def issue(
    *,
    service: str,
    namespace: str,
    ips: Sequence[IPAddress] = (),
    days: int = DEFAULT_DAYS,
    key_type: KeyType = "ec",
    now: datetime.datetime | None = None,
) -> IssuedCertificate:
    """A fresh CA and a serving certificate for Service ``service`` in ``namespace``.

    The CA's key is discarded: nothing can ever sign with it again, so trusting its certificate
    grants nothing beyond this one leaf. ``now`` exists so tests can issue certificates that are
    already old.
    """
    if days < 1:
        raise CertsError(f"--days must be at least 1, got {days}")
    if key_type not in KEY_TYPES:
        raise CertsError(f"key type {key_type!r} is not one of {', '.join(KEY_TYPES)}")
    dns_names = service_dns_names(service, namespace)
    start = (now or datetime.datetime.now(datetime.UTC)) - CLOCK_SKEW
    leaf_end = start + CLOCK_SKEW + datetime.timedelta(days=days)

    ca_key = _new_key(key_type)
    ca_name = _common_name(f"perch CA for {service}.{namespace}")
    ca_end = leaf_end + CA_EXTRA_LIFETIME
    ca_cert = (
        _builder(subject=ca_name, issuer=ca_name, key=ca_key, start=start, end=ca_end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(_ski(ca_key), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    leaf_key = _new_key(key_type)
    leaf_name = _common_name(dns_names[2])
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    sans += [x509.IPAddress(ip) for ip in dict.fromkeys(ips)]
    leaf_cert = (
        _builder(subject=leaf_name, issuer=ca_name, key=leaf_key, start=start, end=leaf_end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # keyEncipherment only means something for RSA key exchange; ECDSA keys only sign.
            _key_usage(key_encipherment=key_type == "rsa"),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(_ski(leaf_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    return IssuedCertificate(
        ca_crt=ca_cert.public_bytes(serialization.Encoding.PEM),
        tls_crt=leaf_cert.public_bytes(serialization.Encoding.PEM),
        tls_key=leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def write_files(issued: IssuedCertificate, out_dir: Path) -> list[Path]:
    """Write ca.crt, tls.crt and tls.key (mode 0600) into ``out_dir``; returns the paths.

    Each file is replaced atomically, because the webhook reloads its certificate when the files
    change and must never read half a file.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        _write_atomic(out_dir / KEY_FILE, issued.tls_key, mode=0o600),
        _write_atomic(out_dir / CERT_FILE, issued.tls_crt, mode=0o644),
        _write_atomic(out_dir / CA_FILE, issued.ca_crt, mode=0o644),
    ]
    return written


def key_type_label(key_type: KeyType) -> str:
    return {"ec": "EC P-256", "rsa": "RSA 2048"}[key_type]


def _new_key(key_type: KeyType) -> PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _common_name(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _ski(key: PrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def _builder(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    key: PrivateKey,
    start: datetime.datetime,
    end: datetime.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )


def _key_usage(*, cert_sign: bool = False, key_encipherment: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _check_label(value: str, *, pattern: re.Pattern[str], what: str) -> None:
    if len(value) > _MAX_LABEL or not pattern.fullmatch(value):
        raise CertsError(
            f"{what} {value!r} is not a valid DNS label "
            f"(lower-case letters, digits and '-', at most {_MAX_LABEL} characters)"
        )


def _write_atomic(path: Path, data: bytes, *, mode: int) -> Path:
    # mkstemp creates the file 0600, so the key is never readable by others, not even briefly.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
