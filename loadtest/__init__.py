"""Load tests (Locust), per-stage latency breakdown from Triton's metrics, and the side-by-side benchmark."""
