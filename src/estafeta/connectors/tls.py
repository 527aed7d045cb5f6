"""TLS to a business's own systems: a destination's trust and client certificate, and what a
failed handshake is called.

Certificates are always verified. Without options a destination gets aiohttp's default
context: the system's CA store (OpenSSL's default paths, which honour `SSL_CERT_FILE` and
`SSL_CERT_DIR`), loaded once at import. A destination that names a private CA
(`tls_ca_file`) or a client certificate (`tls_client_cert`, `tls_client_key`) gets a context
of its own, built once when the connectors start (`client_context`) and passed with each of
its requests; aiohttp keys its pooled connections by context, so a connection made with one
destination's client certificate is never reused for another's.

The same function checks the files when the configuration is loaded: a missing, unreadable
or malformed file is a located configuration error (`TlsFileProblem`), never a failure found
at the first delivery. Neither a key's contents nor its password appear in any message.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

# A PEM file of certificates or a key is a few kilobytes; this refuses a path that names
# something else (a device, a log) before it is read whole.
_PEM_MAX_BYTES = 1024 * 1024
_CERTIFICATE = "-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY = re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")
_ENCRYPTED_KEY = re.compile(r"-----BEGIN ENCRYPTED PRIVATE KEY-----|Proc-Type: 4,ENCRYPTED")


class TlsFileProblem(ValueError):
    """A TLS file a destination names cannot be used; `key` is the setting to mend."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def client_context(
    *,
    ca_file: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
    client_key_password: str | None = None,
) -> ssl.SSLContext:
    """A verifying client context: trusting only `ca_file`'s certificates when given (else the
    system store), presenting `client_cert` (its key in `client_key`, or in the same file)
    when given. Raises `TlsFileProblem` naming the setting at fault."""
    if ca_file is not None:
        text = _read_pem(ca_file, "tls_ca_file")
        if _CERTIFICATE not in text:
            raise TlsFileProblem("tls_ca_file", f"{ca_file!r} holds no PEM certificate")
        try:
            context = ssl.create_default_context(cadata=text)
        except ssl.SSLError as exc:
            raise TlsFileProblem(
                "tls_ca_file", f"{ca_file!r} holds a certificate that cannot be read: {_text(exc)}"
            ) from None
    else:
        context = ssl.create_default_context()
    # As aiohttp's default context: this client speaks HTTP/1.1 only.
    context.set_alpn_protocols(["http/1.1"])
    if client_cert is not None:
        _load_client_certificate(context, client_cert, client_key, client_key_password)
    return context


def _load_client_certificate(
    context: ssl.SSLContext, cert: str, key: str | None, password: str | None
) -> None:
    if _CERTIFICATE not in _read_pem(cert, "tls_client_cert"):
        raise TlsFileProblem("tls_client_cert", f"{cert!r} holds no PEM certificate")
    key_key = "tls_client_key" if key is not None else "tls_client_cert"
    key_text = _read_pem(key or cert, key_key)
    if not _PRIVATE_KEY.search(key_text):
        where = f"{key!r}" if key is not None else f"{cert!r} (and tls_client_key is not set)"
        raise TlsFileProblem(key_key, f"{where} holds no PEM private key")
    encrypted = _ENCRYPTED_KEY.search(key_text) is not None
    if encrypted and password is None:
        raise TlsFileProblem(
            key_key, f"the key in {key or cert!r} is encrypted: set tls_client_key_password"
        )

    def given_password() -> str:
        # OpenSSL asks the terminal for a password it was not given: a service would hang.
        if password is None:
            raise TlsFileProblem(key_key, f"the key in {key or cert!r} needs a password")
        return password

    try:
        context.load_cert_chain(cert, key, password=given_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            message = f"the key in {key or cert!r} does not belong to the certificate in {cert!r}"
        elif encrypted:
            key_key = "tls_client_key_password"
            message = f"cannot decrypt the key in {key or cert!r}: wrong password?"
        else:
            message = f"cannot load the certificate in {cert!r} with its key: {_text(exc)}"
        raise TlsFileProblem(key_key, message) from None


def _read_pem(path: str, key: str) -> str:
    try:
        with Path(path).open("rb") as file:
            data = file.read(_PEM_MAX_BYTES + 1)
    except FileNotFoundError:
        raise TlsFileProblem(key, f"file {path!r} does not exist") from None
    except IsADirectoryError:
        raise TlsFileProblem(key, f"{path!r} is a directory, not a PEM file") from None
    except OSError as exc:
        raise TlsFileProblem(key, f"cannot read {path!r}: {exc.strerror}") from None
    if len(data) > _PEM_MAX_BYTES:
        raise TlsFileProblem(key, f"{path!r} is larger than 1 MiB: not a PEM file")
    return data.decode("ascii", errors="replace")


# -- what a failed handshake is called --------------------------------------------------------

# OpenSSL's verification codes (X509_V_ERR_*) an operator acts on differently.
_EXPIRED = {10}  # CERT_HAS_EXPIRED
_NOT_YET_VALID = {9}  # CERT_NOT_YET_VALID: the destination's clock, or this one's
_UNTRUSTED = {2, 18, 19, 20, 21, 27}  # no issuer found, self-signed, untrusted root …
_WRONG_HOST = {62, 64}  # HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH
# Alerts the destination sends about the certificate this hub presented, or did not.
_CLIENT_CERTIFICATE_REQUIRED = {"TLSV13_ALERT_CERTIFICATE_REQUIRED"}
_CLIENT_CERTIFICATE_REFUSED = {
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "TLSV1_ALERT_UNKNOWN_CA",
    "TLSV1_ALERT_ACCESS_DENIED",
}
_OPENSSL_TEXT = re.compile(r"^(?:\[[^\]]*\] )?(.*?)(?: \(_ssl\.c:\d+\))?$")


def tls_failure(exc: BaseException) -> str | None:
    """What went wrong in the TLS handshake behind `exc` (aiohttp's error or its cause), in
    an operator's words first — `certificate expired: certificate has expired` — or None
    when `exc` is not a TLS failure."""
    error = _ssl_error(exc)
    if error is None:
        return None
    if isinstance(error, ssl.SSLCertVerificationError):
        code, detail = error.verify_code, (error.verify_message or "").rstrip(".")
        if code in _EXPIRED:
            return f"certificate expired: {detail}"
        if code in _NOT_YET_VALID:
            return f"certificate not yet valid: {detail} (is either clock wrong?)"
        if code in _UNTRUSTED:
            return f"certificate not trusted: {detail}"
        if code in _WRONG_HOST:  # OpenSSL's "Hostname mismatch, certificate is not valid …"
            return f"hostname mismatch: {detail.partition(', ')[2] or detail}"
        return f"certificate rejected: {detail or _text(error)}"
    if error.reason in _CLIENT_CERTIFICATE_REQUIRED:
        return f"client certificate required by the destination: {_text(error)}"
    if error.reason in _CLIENT_CERTIFICATE_REFUSED:
        return f"client certificate refused by the destination: {_text(error)}"
    if error.reason == "WRONG_VERSION_NUMBER":
        return f"TLS handshake failed: {_text(error)} (does the port serve plain http?)"
    return f"TLS handshake failed: {_text(error)}"


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The `ssl.SSLError` behind aiohttp's exception, if any: its `certificate_error` or
    `os_error`, the error it was raised from, or itself. (aiohttp's own certificate error
    is an `ssl.CertificateError` too, without OpenSSL's code: looked at last.)"""
    seen: list[object] = [
        getattr(exc, "certificate_error", None),
        getattr(exc, "os_error", None),
        exc.__cause__,
        exc,
    ]
    return next((each for each in seen if isinstance(each, ssl.SSLError)), None)


def _text(error: ssl.SSLError) -> str:
    """OpenSSL's words without its tags: `tlsv1 alert unknown ca`, not
    `[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca (_ssl.c:1006)`."""
    message = error.strerror if isinstance(error.strerror, str) else str(error)
    match = _OPENSSL_TEXT.match(message)
    return match.group(1) if match else message


__all__ = ["TlsFileProblem", "client_context", "tls_failure"]
