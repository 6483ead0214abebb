"""The policy registry: policy name -> policy class.

Kept apart from the policies so that ``config.py`` can look a policy up (to let it check its own
options) without importing any policy module: policies register here, the config only reads here.
"""

from __future__ import annotations

from typing import Any

POLICIES: dict[str, Any] = {}


def register_policy(cls: Any) -> Any:
    """Add ``cls`` to ``POLICIES`` under ``cls.name`` (usable as a class decorator)."""
    POLICIES[cls.name] = cls
    return cls
