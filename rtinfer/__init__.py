"""Shared logic of the encrypted, audited classification service.

The Triton adapters under model_repository/, the clients and the tests all import
these modules, so the code that seals a payload in a client is the code that opens
it in the server. The harness that starts servers (tritonserver, the gateway, Redis,
Prometheus) is the subpackage ``rtinfer.launch``: nothing Triton loads imports it, and
nothing under rtinfer/ imports ``clients`` or ``loadtest`` (tests/test_import_graph.py).
"""
