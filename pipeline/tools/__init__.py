"""The operator commands beside ``run``: dlq, replay, top, demo, produce/results, models."""
