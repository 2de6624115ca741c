"""Load and verify a CRL, and turn its entries into certificate statuses.

The one CRL reader of every source: the OpenSSL source (a CRL file next to
``index.txt``), the Vault source (the CRLs a PKI mount publishes) and any other.
A CRL is only believed after its signature verifies against the issuer's public
key and its issuer name matches the issuer's subject; anything else is a
:class:`~hsmocsp.errors.SourceError`, so a CRL of the wrong CA (or a corrupted
download) never changes a status.

Entries keep the reason and invalidity date the CRL gives them (``reason`` is
``None`` when the entry has no CRLReason extension, so the OCSP response can
omit it instead of claiming ``unspecified``). ``removeFromCRL`` entries mean
"no longer revoked" (OpenSSL's ``-gencrl`` lists them after an unhold) and are
left out of ``revoked``. Delta CRLs and indirect CRLs are refused: a delta's
entries are not the full list, and an indirect CRL's entries may belong to
another CA.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding

from hsmocsp.errors import SourceError
from hsmocsp.status import CertStatus, CRLReason

__all__ = ["CRLInfo", "load_crl", "merged_revocations"]


@dataclass(frozen=True, slots=True, eq=False)
class CRLInfo:
    """A verified CRL: its DER (for publishing) and what it says."""

    der: bytes
    this_update: datetime
    next_update: datetime | None
    revoked: dict[int, CertStatus]
    crl_number: int | None
    warnings: tuple[str, ...] = ()

    def changed_serials(self, newer: CRLInfo) -> set[int]:
        """Serials whose CRL entry appeared, disappeared or changed."""
        changed = set(self.revoked.keys() ^ newer.revoked.keys())
        for serial, status in self.revoked.items():
            other = newer.revoked.get(serial)
            if other is not None and other != status:
                changed.add(serial)
        return changed


def _parse(data: bytes) -> x509.CertificateRevocationList:
    try:
        if data.lstrip()[:11] == b"-----BEGIN ":
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as err:
        raise SourceError(f"not a CRL (PEM or DER): {err}") from err


def _entry_status(entry: x509.RevokedCertificate, warnings: list[str]) -> CertStatus | None:
    """The status an entry gives its serial; None for removeFromCRL.

    An entry whose extensions cannot be parsed (OpenSSL writes an invalidity
    date with fractional seconds if told to, which RFC 5280 forbids and
    cryptography refuses) still revokes its serial: the signed CRL says so.
    It keeps its revocation date, loses reason and invalidity date, and the
    problem is added to ``warnings``.
    """
    reason: CRLReason | None = None
    invalidity: datetime | None = None
    try:
        extensions = entry.extensions
    except ValueError as err:
        warnings.append(
            f"entry for serial {entry.serial_number:X}: unreadable extensions ({err});"
            " taken as revoked without a reason"
        )
        return CertStatus.revoked(entry.revocation_date_utc)
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.CRLReason):
            if value.reason is x509.ReasonFlags.remove_from_crl:
                return None
            reason = CRLReason[value.reason.value]
        elif isinstance(value, x509.InvalidityDate):
            invalidity = value.invalidity_date_utc
        elif isinstance(value, x509.CertificateIssuer):
            raise SourceError(
                f"entry for serial {entry.serial_number:X} has a certificateIssuer"
                " extension (indirect CRLs are not supported)"
            )
        elif ext.critical:
            # RFC 5280 5.3: a CRL with a critical entry extension we cannot
            # process must not be used at all.
            raise SourceError(
                f"entry for serial {entry.serial_number:X} has an unknown critical"
                f" extension {ext.oid.dotted_string}"
            )
    return CertStatus.revoked(entry.revocation_date_utc, reason, invalidity)


def load_crl(data: bytes, issuer: x509.Certificate) -> CRLInfo:
    """Parse ``data`` (PEM or DER), verify it was issued by ``issuer``, extract it.

    Raises :class:`SourceError` if the CRL is malformed, names another issuer,
    has a bad signature, is a delta or indirect CRL, or has an unknown critical
    extension.
    """
    crl = _parse(data)
    if crl.issuer != issuer.subject:
        raise SourceError(
            f"CRL issuer {crl.issuer.rfc4514_string()!r} is not the CA"
            f" {issuer.subject.rfc4514_string()!r}"
        )
    try:
        valid = crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError, UnsupportedAlgorithm) as err:
        raise SourceError(f"cannot verify the CRL signature: {err}") from err
    if not valid:
        raise SourceError(
            "bad signature: the CRL signature does not verify with the key of"
            f" {issuer.subject.rfc4514_string()!r}"
        )
    crl_number: int | None = None
    try:
        for ext in crl.extensions:
            value = ext.value
            if isinstance(value, x509.CRLNumber):
                crl_number = value.crl_number
            elif isinstance(value, x509.DeltaCRLIndicator):
                raise SourceError("delta CRLs are not supported (need a full CRL)")
            elif isinstance(value, x509.IssuingDistributionPoint) and value.indirect_crl:
                raise SourceError("indirect CRLs are not supported")
            elif ext.critical and not isinstance(
                value, x509.IssuingDistributionPoint | x509.AuthorityKeyIdentifier
            ):
                raise SourceError(f"unknown critical CRL extension {ext.oid.dotted_string}")
    except ValueError as err:
        raise SourceError(f"bad CRL extension: {err}") from err
    revoked: dict[int, CertStatus] = {}
    warnings: list[str] = []
    try:
        for entry in crl:
            status = _entry_status(entry, warnings)
            if status is not None:
                revoked[entry.serial_number] = status
    except ValueError as err:
        raise SourceError(f"bad CRL entry: {err}") from err
    return CRLInfo(
        der=crl.public_bytes(Encoding.DER),
        this_update=crl.last_update_utc,
        next_update=crl.next_update_utc,
        revoked=revoked,
        crl_number=crl_number,
        warnings=tuple(warnings),
    )


def merged_revocations(crls: Iterable[CRLInfo]) -> dict[int, CertStatus]:
    """The revoked serials of several CRLs of one source (e.g. the issuers of one Vault
    mount, whose serials are unique per mount); a later CRL's entry wins."""
    merged: dict[int, CertStatus] = {}
    for crl in crls:
        merged.update(crl.revoked)
    return merged
