"""A VLA's vision encoder under ``torch.compile``, with the uint8 -> pixel normalisation in its graph.

Why: done eagerly, the conversion of a frame into normalised pixels is a dozen small ops (tens of
microseconds per step on a CPU, about 2% of the compact VLA's compiled step); inside the graph
inductor fuses them into one kernel in front of the first convolution. A frame at the model's own
size goes through that graph. A frame of any other size is resized eagerly (antialiased bilinear,
as the eager path does) and goes through a second graph over pixels, so a camera at another
resolution still runs compiled, with one fixed shape per graph.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from kv_vla.cache.storage.compiled import compile_options, compiling, warm_call


class CompiledImageEncoder:
    """``model.encode_pixels(model.pixel_values(frame), condition)``, compiled; call like ``embed_image``.

    ``warmup_s`` maps each graph (``"vision frames"``, ``"vision pixels"``) to the seconds its first
    call took; :meth:`warm_up` compiles both before the first episode.
    """

    def __init__(self, model: Any, mode: str | None = None) -> None:
        self.model = model
        self.size = int(model.image_size)
        options = compile_options(mode)
        self._graphs = {
            "frames": torch.compile(self._encode_frames, dynamic=False, **options),
            "pixels": torch.compile(model.encode_pixels, dynamic=False, **options),
        }
        self.warmup_s: dict[str, float] = {}

    def _encode_frames(self, frames: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        return self.model.encode_pixels(self.model.pixel_values(frames), condition)

    def __call__(self, frame: Any, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Visual tokens ``[1, N, H]`` of one uint8 ``HxWx3`` frame (or preprocessed pixels)."""
        at_size = isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.shape == (self.size, self.size, 3)
        if at_size:
            name, x = "frames", torch.as_tensor(frame, device=self.model.device)
        else:
            name, x = "pixels", self.model.pixel_values(frame)
        graph = self._graphs[name]
        key = f"vision {name}"
        if key in self.warmup_s:  # this graph's one shape was compiled before
            return warm_call(graph, x, condition)
        t0 = time.perf_counter()
        with compiling(x.device.type):
            out = graph(x, condition)
        self.warmup_s[key] = time.perf_counter() - t0
        return out

    def warm_up(self, condition: torch.Tensor | None = None) -> None:
        """Compile both graphs on black frames: one at the model's size, one a pixel larger."""
        for side in (self.size, self.size + 1):
            self(np.zeros((side, side, 3), dtype=np.uint8), condition)
