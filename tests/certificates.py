"""Certificates made for a test, as a business's own systems have them: a private CA, a
server certificate it signed for 127.0.0.1 and localhost, an expired one, one for another
host, a self-signed one, and client certificates for mutual TLS.

EC keys (P-256): made in a millisecond, where an RSA key takes tens of them.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOCAL_NAMES = ("127.0.0.1", "localhost")


@dataclass(frozen=True, slots=True)
class Pair:
    """A certificate and its private key, each a PEM file."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class Certificates:
    ca: Path  # the private CA's certificate, what a destination's tls_ca_file names
    server: Pair  # signed by the CA for 127.0.0.1 and localhost
    expired: Pair  # as `server`, but its validity ended yesterday
    wrong_host: Pair  # signed by the CA for crm.clinic.example only
    self_signed: Pair  # for 127.0.0.1 and localhost, signed by its own key
    client: Pair  # a client certificate signed by the CA (CN hub-client)
    other_client: Pair  # another one (CN other-client)
    stranger: Pair  # a client certificate signed by a CA the server does not trust
    encrypted_key: Path  # `client`'s key, encrypted with the password "s3cret"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(
    directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Pair:
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pair


def _sans(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


class _Authority:
    def __init__(self, common_name: str) -> None:
        self.key = _key()
        self.name = _name(common_name)
        now = datetime.now(UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self,
        common_name: str,
        *,
        hosts: tuple[str, ...] = (),
        client: bool = False,
        expired: bool = False,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = _key()
        now = datetime.now(UTC)
        ends = now - timedelta(days=1) if expired else now + timedelta(days=30)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(ends - timedelta(days=60))
            .not_valid_after(ends)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if hosts:
            builder = builder.add_extension(_sans(hosts), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key


def make_certificates(directory: Path) -> Certificates:
    """Every certificate a TLS test needs, written as PEM files under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _Authority("Clinic Private CA")
    (directory / "ca.pem").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))

    def issued(
        name: str,
        common_name: str,
        *,
        hosts: tuple[str, ...] = (),
        client: bool = False,
        expired: bool = False,
    ) -> Pair:
        cert, key = ca.issue(common_name, hosts=hosts, client=client, expired=expired)
        return _write(directory, name, cert, key)

    # Self-signed as the appliances make them: its own issuer, valid for the local names.
    own_key = _key()
    now = datetime.now(UTC)
    self_signed = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(_name("localhost"))
        .public_key(own_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(_sans(LOCAL_NAMES), critical=False)
        .sign(own_key, hashes.SHA256())
    )
    client = issued("client", "hub-client", client=True)
    encrypted_key = directory / "client-encrypted.key"
    loaded = serialization.load_pem_private_key(client.key.read_bytes(), password=None)
    encrypted_key.write_bytes(
        loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    other_ca = _Authority("Someone Else's CA")
    stranger_cert, stranger_key = other_ca.issue("stranger", client=True)
    return Certificates(
        ca=directory / "ca.pem",
        server=issued("server", "localhost", hosts=LOCAL_NAMES),
        expired=issued("expired", "localhost", hosts=LOCAL_NAMES, expired=True),
        wrong_host=issued("wrong-host", "crm.clinic.example", hosts=("crm.clinic.example",)),
        self_signed=_write(directory, "self-signed", self_signed, own_key),
        client=client,
        other_client=issued("other-client", "other-client", client=True),
        stranger=_write(directory, "stranger", stranger_cert, stranger_key),
        encrypted_key=encrypted_key,
    )


def server_context(served: Pair, *, client_ca: Path | None = None) -> ssl.SSLContext:
    """A TLS server's context serving `served`; with `client_ca`, clients must present a
    certificate that CA signed (mutual TLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(served.cert, served.key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=client_ca)
    return context
