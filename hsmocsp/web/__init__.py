"""HTTP layer: the Klein app (OCSP, published CA/CRL, probes, metrics)."""
