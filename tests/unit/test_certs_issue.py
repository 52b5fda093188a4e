"""certs.issue and `perch-certs issue`: what the API server will check when it calls the webhook."""

from __future__ import annotations

import datetime
import ipaddress
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs.__main__ import main
from certs.errors import CertsError
from certs.issue import IssuedCertificate, KeyType, issue, parse_ip, write_files

SERVICE, NAMESPACE = "perch-webhook", "perch"
NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


E = TypeVar("E", bound=x509.ExtensionType)


def _ext(cert: x509.Certificate, kind: type[E]) -> x509.Extension[E]:
    return cert.extensions.get_extension_for_class(kind)


@pytest.fixture(scope="module")
def ec_issued() -> IssuedCertificate:
    return issue(
        service=SERVICE,
        namespace=NAMESPACE,
        ips=[ipaddress.ip_address("10.0.0.7"), ipaddress.ip_address("fd00::7")],
        days=90,
        now=NOW,
    )


def test_leaf_names_every_form_of_the_service_and_each_ip(ec_issued: IssuedCertificate) -> None:
    sans = _ext(_cert(ec_issued.tls_crt), x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [
        "perch-webhook",
        "perch-webhook.perch",
        "perch-webhook.perch.svc",
        "perch-webhook.perch.svc.cluster.local",
    ]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("fd00::7"),
    ]


def test_leaf_is_a_server_certificate_and_not_a_ca(ec_issued: IssuedCertificate) -> None:
    leaf = _cert(ec_issued.tls_crt)
    assert _ext(leaf, x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH]
    )
    constraints = _ext(leaf, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is False
    usage = _ext(leaf, x509.KeyUsage).value
    assert usage.digital_signature
    assert not usage.key_cert_sign
    # An ECDSA key cannot encipher; claiming it would be wrong, not just redundant.
    assert not usage.key_encipherment


def test_ca_may_sign_certificates(ec_issued: IssuedCertificate) -> None:
    ca = _cert(ec_issued.ca_crt)
    constraints = _ext(ca, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is True
    assert _ext(ca, x509.KeyUsage).value.key_cert_sign
    assert ca.subject == ca.issuer
    _cert(ec_issued.tls_crt).verify_directly_issued_by(ca)


def test_validity_is_days_from_now_and_the_ca_outlives_the_leaf(
    ec_issued: IssuedCertificate,
) -> None:
    leaf, ca = _cert(ec_issued.tls_crt), _cert(ec_issued.ca_crt)
    assert leaf.not_valid_after_utc == NOW + datetime.timedelta(days=90)
    # Backdated a little for clock skew, never into the future.
    assert NOW - datetime.timedelta(hours=1) < leaf.not_valid_before_utc <= NOW
    assert ca.not_valid_before_utc <= leaf.not_valid_before_utc
    assert ca.not_valid_after_utc > leaf.not_valid_after_utc


def test_default_is_ec_p256_with_a_matching_key(ec_issued: IssuedCertificate) -> None:
    key = serialization.load_pem_private_key(ec_issued.tls_key, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert key.public_key() == _cert(ec_issued.tls_crt).public_key()


def test_rsa_option_gives_2048_bit_keys_with_key_encipherment() -> None:
    issued = issue(service=SERVICE, namespace=NAMESPACE, key_type="rsa")
    key = serialization.load_pem_private_key(issued.tls_key, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 2048
    assert isinstance(_cert(issued.ca_crt).public_key(), rsa.RSAPublicKey)
    assert _ext(_cert(issued.tls_crt), x509.KeyUsage).value.key_encipherment


def test_default_validity_is_a_year() -> None:
    leaf = _cert(issue(service=SERVICE, namespace=NAMESPACE, now=NOW).tls_crt)
    assert leaf.not_valid_after_utc == NOW + datetime.timedelta(days=365)


@pytest.mark.parametrize(
    ("service", "namespace", "days", "message"),
    [
        ("Perch", NAMESPACE, 1, "service name 'Perch' is not a valid DNS label"),
        (SERVICE, "a.b", 1, "namespace 'a.b' is not a valid DNS label"),
        ("x" * 64, NAMESPACE, 1, "is not a valid DNS label"),
        (SERVICE, NAMESPACE, 0, "--days must be at least 1"),
    ],
)
def test_bad_input_is_refused_with_a_reason(
    service: str, namespace: str, days: int, message: str
) -> None:
    with pytest.raises(CertsError, match=message):
        issue(service=service, namespace=namespace, days=days)


def test_parse_ip_names_the_bad_value() -> None:
    assert parse_ip("fd00::7") == ipaddress.ip_address("fd00::7")
    with pytest.raises(CertsError, match=re.escape("'10.0.0.300' is not an IP address")):
        parse_ip("10.0.0.300")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_openssl_verifies_the_leaf_against_the_ca_for_server_use(
    tmp_path: Path, key_type: KeyType
) -> None:
    issued = issue(service=SERVICE, namespace=NAMESPACE, key_type=key_type)
    write_files(issued, tmp_path)
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-purpose",
            "sslserver",
            "-verify_hostname",
            "perch-webhook.perch.svc",
            "-CAfile",
            str(tmp_path / "ca.crt"),
            str(tmp_path / "tls.crt"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_rejects_the_leaf_against_another_ca(tmp_path: Path) -> None:
    # The positive check above is only meaningful if verification can fail.
    write_files(issue(service=SERVICE, namespace=NAMESPACE), tmp_path / "a")
    write_files(issue(service=SERVICE, namespace=NAMESPACE), tmp_path / "b")
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "a/ca.crt"), str(tmp_path / "b/tls.crt")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0


def test_cli_issue_writes_three_files_and_keeps_the_key_private(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tls"
    code = main(
        [
            "issue",
            "--service",
            SERVICE,
            "--namespace",
            NAMESPACE,
            "--out-dir",
            str(out),
            "--days",
            "30",
            "--ip",
            "192.0.2.1",
            "--key-type",
            "rsa",
        ]
    )
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
    assert stat.S_IMODE((out / "tls.key").stat().st_mode) == 0o600
    leaf = _cert((out / "tls.crt").read_bytes())
    assert ipaddress.ip_address("192.0.2.1") in _ext(
        leaf, x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.IPAddress)
    assert "perch-webhook.perch.svc" in capsys.readouterr().out


def test_cli_issue_tightens_an_existing_key_file(tmp_path: Path) -> None:
    (tmp_path / "tls.key").write_bytes(b"old")
    (tmp_path / "tls.key").chmod(0o644)
    assert (
        main(["issue", "--service", SERVICE, "--namespace", NAMESPACE, "--out-dir", str(tmp_path)])
        == 0
    )
    assert stat.S_IMODE((tmp_path / "tls.key").stat().st_mode) == 0o600
    assert (tmp_path / "tls.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_console_script_bad_ip_exits_2_with_one_clear_line(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("perch-certs")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "certs"]
    result = subprocess.run(
        [
            *command,
            "issue",
            "--service",
            SERVICE,
            "--namespace",
            NAMESPACE,
            "--out-dir",
            str(tmp_path / "out"),
            "--ip",
            "10.0.0.300",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--ip" in lines[0]
    assert "'10.0.0.300' is not an IP address" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--service", "Bad_Name", "--namespace", NAMESPACE], "service name 'Bad_Name'"),
        (["--service", SERVICE, "--namespace", NAMESPACE, "--days", "0"], "argument --days"),
        (["--service", SERVICE], "the following arguments are required: --namespace"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["issue", "--out-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert message in err
