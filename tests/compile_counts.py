"""How many graphs a test process compiled, by ``torch.compile`` or ahead of time (AOTInductor)."""

from __future__ import annotations


def compiled_graphs() -> int:
    """Graphs compiled so far in this process, by ``torch.compile`` or ahead of time."""
    from torch._dynamo.utils import counters

    from kv_vla.cache.storage.compiled import compiled_count

    return int(counters["stats"]["unique_graphs"]) + compiled_count()
