"""A test CA and the certificates the TLS tests and benchmark need, made with `cryptography`.

``make_pki(dir)`` writes PEM files: ``ca.pem`` (the CA the clients trust), ``broker.pem``
and ``broker.key`` (for 127.0.0.1 and localhost), ``wrong-host.pem``/``.key`` (signed by
the CA, for another host name only), ``client.pem``/``.key`` (a client certificate the CA
signed, for mutual TLS), and ``rogue-ca.pem`` with ``rogue-client.pem``/``.key`` (a CA
nobody trusts, and a client certificate it signed).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    """The folder of a test PKI; ``pki.ca_pem`` names ``ca.pem`` in it."""

    dir: Path

    def __getattr__(self, name: str) -> str:  # pki.ca_pem → dir/ca.pem
        stem, _, ext = name.rpartition("_")
        return str(self.dir / f"{stem.replace('_', '-')}.{ext}")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _cert(
    cn: str,
    issuer: tuple[ec.EllipticCurvePrivateKey, x509.Name] | None,
    sans: list[x509.GeneralName] | None = None,
    client: bool = False,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    signer, issuer_name = issuer if issuer else (key, _name(cn))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if issuer is not None:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return key, builder.sign(signer, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = _cert("kp-test-ca", None)
    _write(directory / "ca", ca_key, ca)
    local: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.DNSName("localhost"),
    ]
    _write(directory / "broker", *_cert("localhost", (ca_key, ca.subject), local))
    elsewhere: list[x509.GeneralName] = [x509.DNSName("elsewhere.example")]
    _write(directory / "wrong-host", *_cert("elsewhere.example", (ca_key, ca.subject), elsewhere))
    _write(directory / "client", *_cert("kp-client", (ca_key, ca.subject), client=True))
    rogue_key, rogue = _cert("rogue-ca", None)
    _write(directory / "rogue-ca", rogue_key, rogue)
    _write(directory / "rogue-client", *_cert("kp-client", (rogue_key, rogue.subject), client=True))
    return Pki(directory)
