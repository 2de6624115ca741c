"""twistd plugin: ``twistd hsmocsp --config etc/hsmocsp.yaml``.

Kept to one lazy line (as twisted_web.py does) so ``twistd --help`` stays cheap;
the real code is in :mod:`hsmocsp.tap`.
"""

from twisted.application.service import ServiceMaker

hsmocsp = ServiceMaker(  # type: ignore[no-untyped-call]
    "hsmocsp",
    "hsmocsp.tap",
    "OCSP responder (RFC 6960/5019) signing with a PKCS#11 HSM",
    "hsmocsp",
)
