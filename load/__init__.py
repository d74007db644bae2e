"""Load generation and benchmarks for kp-pipeline (figures are printed, never asserted)."""
