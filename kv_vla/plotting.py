"""matplotlib without a display, imported only when a plot is written (it is slow to import)."""

from __future__ import annotations

from typing import Any


def headless_pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the Agg backend (PNG files, no display), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
