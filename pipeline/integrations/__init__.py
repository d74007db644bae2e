"""kp-pipeline's models served from other stream processors (Faust)."""
