"""Pure ASGI middleware: request context (id, metrics, access log) and the body-size limit."""
