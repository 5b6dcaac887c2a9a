"""The inference engine: decode, batch, one backbone forward per batch, fan-out to tuners.

The HTTP layer uses :class:`server.engine.service.InferenceService` only. Nothing in this
package imports FastAPI.
"""
