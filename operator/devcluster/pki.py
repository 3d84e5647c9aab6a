"""Certificates and keys for the local control plane.

The cluster runs with real TLS and client-certificate authentication, like a
kubeadm cluster: a CA, a serving certificate for kube-apiserver, a client
certificate in ``system:masters`` for the admin kubeconfig (used by the other
components and by tests), and the RSA key that signs service-account tokens.
Called once per cluster start by :mod:`.cluster`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALID_FOR = dt.timedelta(days=365)
ADMIN_USER = "modelyard-admin"
OPERATOR_USER = "modelyard-operator"


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files written by :func:`create_pki`."""

    dir: Path

    ca_cert = property(lambda self: self.dir / "ca.crt")
    ca_key = property(lambda self: self.dir / "ca.key")
    serving_cert = property(lambda self: self.dir / "apiserver.crt")
    serving_key = property(lambda self: self.dir / "apiserver.key")
    admin_cert = property(lambda self: self.dir / "admin.crt")
    admin_key = property(lambda self: self.dir / "admin.key")
    operator_cert = property(lambda self: self.dir / "operator.crt")
    operator_key = property(lambda self: self.dir / "operator.key")
    sa_key = property(lambda self: self.dir / "sa.key")
    sa_pub = property(lambda self: self.dir / "sa.pub")


def create_pki(directory: Path, service_ip: str) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelyard-local-ca")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(pki.ca_key, ca_key)
    pki.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    sans: list[x509.GeneralName] = [
        x509.DNSName(n)
        for n in ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                  "kubernetes.default.svc.cluster.local")
    ]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", service_ip)]
    _leaf(pki.serving_cert, pki.serving_key, "kube-apiserver", None,
          ca_cert=ca_cert, ca_key=ca_key, now=now, sans=sans, server=True)
    _leaf(pki.admin_cert, pki.admin_key, ADMIN_USER, "system:masters",
          ca_cert=ca_cert, ca_key=ca_key, now=now, sans=[], server=False)
    # A separate identity for an operator run locally, so the audit log can tell its writes apart.
    _leaf(pki.operator_cert, pki.operator_key, OPERATOR_USER, "system:masters",
          ca_cert=ca_cert, ca_key=ca_key, now=now, sans=[], server=False)

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(pki.sa_key, sa_key)
    pki.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pki


def issue_client_cert(pki: Pki, stem: str, common_name: str,
                      organisation: str | None) -> tuple[Path, Path]:
    """A client certificate signed by the cluster's CA (``<stem>.crt``, ``<stem>.key``):
    a real node's kubelet (``system:node:NAME`` in ``system:nodes``) or kube-proxy."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{pki.ca_key} is not the EC key create_pki writes")
    cert, key = pki.dir / f"{stem}.crt", pki.dir / f"{stem}.key"
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    _leaf(cert, key, common_name, organisation, ca_cert=ca_cert, ca_key=ca_key, now=now,
          sans=[], server=False)
    return cert, key


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
    now: dt.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _VALID_FOR)
    )


def _leaf(
    cert_path: Path, key_path: Path, common_name: str, organisation: str | None,
    *, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, now: dt.datetime,
    sans: list[x509.GeneralName], server: bool,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organisation:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation))
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(x509.Name(attrs), ca_cert.subject, key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    _write_key(key_path, key)
    cert_path.write_bytes(
        builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
