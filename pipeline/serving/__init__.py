"""The model side, shared by every front door (the Kafka loop, the Faust adapter).

A served model is a `graph.ServedModel`; requests are checked and keyed by `routing`, run
by `runtime` (threads, instances, retries, poison isolation), and every request's fate
becomes one encoded `outcomes.Outcome`.
"""
