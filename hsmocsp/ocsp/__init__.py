"""The OCSP wire format: parse requests (:mod:`.request`), build responses (:mod:`.response`).

Requests are decoded with pyasn1 (robust, strict about structure); responses are
assembled by direct DER concatenation (:mod:`.der`), because building one per
request must be cheap and the signed bytes must be reproduced exactly.
"""
