"""Reproduces the paper's validation (arXiv 2503.05424, Tables 1 and 2) and checks
the test's statistical honesty, all through the running gRPC service.

A client of the API (the SDK) that uses the synthetic world's ground truth:
`bench/validate_*.py` and `make validate` drive it; the integration tests run a
small version of each part.
"""
