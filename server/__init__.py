"""The restune inference service: FastAPI routes over a batching multi-task engine."""
