"""Performance tooling: analytic FLOPs and MFU, step benchmarks, profile summaries."""
