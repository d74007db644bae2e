"""What services import: the client that sends requests to a kp-pipeline and reads answers.

    from kp_pipeline import Client, AsyncClient, InferenceError

See `pipeline.client` for the contract (reply topics, correlation ids, dead letters).
"""

from pipeline.client import AsyncClient, Client, InferenceError, as_request

__all__ = ["AsyncClient", "Client", "InferenceError", "as_request"]
