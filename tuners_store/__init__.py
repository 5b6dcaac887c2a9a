"""Tuner artifacts and the stores that keep them (filesystem, Redis). Never imports torch."""
