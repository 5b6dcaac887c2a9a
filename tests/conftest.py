"""Shared fixtures live in tests/fixtures/, one module per concern, loaded as plugins."""

pytest_plugins = [
    "tests.fixtures.redis_server",
    "tests.fixtures.models",
    "tests.fixtures.tuners",
    "tests.fixtures.live_server",
    "tests.fixtures.onnx_exports",
]
