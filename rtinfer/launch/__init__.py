"""The harness around the service: what starts tritonserver, the gateway (HAProxy), Redis and Prometheus,
for `make serve`, the tests and the benchmarks. Nothing Triton loads imports this package (the stages
import only ``rtinfer``'s other modules; tests/test_import_graph.py checks it).

    python -m rtinfer.launch.server       tritonserver on this model repository (make serve-direct)
    python -m rtinfer.launch.gateway      Triton behind the gateway, or a fleet with --replicas (make serve)
    python -m rtinfer.launch.edge_cloud   an edge and a cloud Triton on loopback (make serve-edge-cloud)
    python -m rtinfer.launch.observe      Triton, gateway and Prometheus under load and attack (make observe)
    python -m rtinfer.launch.redis_server a Redis replay store (ACL user, AOF, TLS)

``rtinfer.launch.process`` holds the process helpers they share (free ports, stopping a process group,
children that die with their launcher).
"""
