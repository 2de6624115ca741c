"""The RFC 5019 response headers, written once for every HTTP path.

The Klein route (:meth:`OCSPApp.render`), the fast path and the fronts
(:class:`~hsmocsp.web.fastpath.ResponseWriter`) all take their header names and
values from here, so a cached answer carries the same headers whichever process
and path sends it (#8.4).
"""

from __future__ import annotations

import functools
from email.utils import formatdate
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hsmocsp.handle import SignedResponse

OCSP_REQUEST = b"application/ocsp-request"
OCSP_RESPONSE = b"application/ocsp-response"
#: Errors, unauthorized and nonce answers: a certificate may be seconds old, so no cache
#: may keep them (Boulder's practice).
NO_CACHE = b"max-age=0, no-cache, no-store"


@functools.lru_cache(maxsize=4096)
def http_date(seconds: float) -> bytes:
    """RFC 7231 date; remembered, since responses signed in one second share theirs."""
    return formatdate(seconds, usegmt=True).encode("ascii")


def cache_control(max_age: int) -> bytes:
    """RFC 5019 section 6.2 Cache-Control for a cacheable response."""
    return b"max-age=%d, public, no-transform, must-revalidate" % max_age


def validators(response: SignedResponse) -> list[tuple[bytes, bytes]]:
    """Last-Modified (thisUpdate), Expires (nextUpdate) and ETag (hash of the bytes)."""
    return [
        (b"Last-Modified", http_date(response.this_update)),
        (b"Expires", http_date(response.next_update)),
        (b"ETag", response.etag.encode("ascii")),
    ]


def content_headers(length: int) -> list[tuple[bytes, bytes]]:
    """An explicit length: some OCSP clients do not read chunked responses."""
    return [(b"Content-Type", OCSP_RESPONSE), (b"Content-Length", b"%d" % length)]


def header_lines(headers: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(b"%s: %s\r\n" % header for header in headers)
