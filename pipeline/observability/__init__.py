"""What operators see: Prometheus metrics, and the /healthz, /readyz and /metrics server."""
