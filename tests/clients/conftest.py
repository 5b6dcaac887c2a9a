"""Fixtures of the client tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.clients.fault_peer import FaultPeer


@pytest.fixture
def fault_peer() -> Iterator[FaultPeer]:
    """A scripted HTTP peer on a free local port (fault injection for the transport)."""
    peer = FaultPeer()
    yield peer
    peer.close()
