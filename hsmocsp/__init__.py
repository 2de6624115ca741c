"""hsmocsp: an RFC 6960 / RFC 5019 OCSP responder whose signing keys stay in a PKCS#11 HSM."""

__version__ = "0.1.0"
