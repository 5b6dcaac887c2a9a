"""One tuner version loaded in memory: an immutable snapshot a batch can hold on to."""

from __future__ import annotations

from dataclasses import dataclass

from restuning.tuners import TaskModule
from tuners_store.base import VersionInfo
from tuners_store.config import TunerConfig

TunerKey = tuple[str, int, str]
"""(name, version, sha256): identifies a loaded version everywhere (caches, groups)."""


@dataclass(frozen=True, eq=False)
class LoadedTuner:
    """A built task module and the store facts about it.

    Never mutated: a newer version is a new object. A batch that resolved this object
    finishes on it even if the registry has since swapped in, or evicted, another.
    """

    name: str
    version: int
    sha256: str
    config: TunerConfig
    module: TaskModule
    nbytes: int
    """Bytes of the module's parameters and buffers (what the memory budget counts)."""
    info: VersionInfo | None = None
    """The store's record of this version (size, created_at), when known."""

    @property
    def key(self) -> TunerKey:
        return (self.name, self.version, self.sha256)

    @property
    def params(self) -> int:
        """Number of scalars in the artifact's tensors."""
        return sum(t.numel() for t in self.module.state_dict().values())


def module_nbytes(module: TaskModule) -> int:
    """Bytes held by a module's parameters and buffers (the final-norm copy included)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
