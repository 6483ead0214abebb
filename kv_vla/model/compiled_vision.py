"""A VLA's vision encoder under ``torch.compile``, with the uint8 -> pixel normalisation in its graph.

Why: done eagerly, the conversion of a frame into normalised pixels is a dozen small ops (tens of
microseconds per step on a CPU, about 2% of the compact VLA's compiled step); inside the graph
inductor fuses them into one kernel in front of the first convolution. A frame at the model's own
size goes through that graph. A frame of any other size is resized eagerly (antialiased bilinear,
as the eager path does) and goes through a second graph over pixels, so a camera at another
resolution still runs compiled, with one fixed shape per graph. On CPU both graphs are compiled
ahead of time (:func:`kv_vla.cache.storage.compiled.aot_compile`), elsewhere by ``torch.compile``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from kv_vla.cache.storage import compiled
from kv_vla.cache.storage.compiled import aot_compile, compile_options, compiling, warm_call


def _encode_frames(model: Any, frames: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
    return model.encode_pixels(model.pixel_values(frames), condition)


def _encode_pixels(model: Any, pixels: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
    return model.encode_pixels(pixels, condition)


class _Encoder(torch.nn.Module):
    """One of the two graphs as a module (what ``torch.export`` traces); ``condition`` optional."""

    def __init__(self, model: Any, name: str) -> None:
        super().__init__()
        self.model = model
        self.fn = _encode_frames if name == "frames" else _encode_pixels

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        return self.fn(self.model, x, condition)


class CompiledImageEncoder:
    """``model.encode_pixels(model.pixel_values(frame), condition)``, compiled; call like ``embed_image``.

    ``warmup_s`` maps each graph (``"vision frames"``, ``"vision pixels"``) to the seconds its first
    call took; :meth:`warm_up` compiles both before the first episode.
    """

    def __init__(self, model: Any, mode: str | None = None, ahead_of_time: bool | None = None) -> None:
        self.model = model
        self.size = int(model.image_size)
        if ahead_of_time is None:  # on CPU (compiled.aot_compile: no dynamo on the call path)
            on_cpu = torch.device(model.device).type == "cpu"
            ahead_of_time = on_cpu and mode is None and compiled.AHEAD_OF_TIME_ON_CPU
        self.ahead_of_time = ahead_of_time
        options = compile_options(mode)
        self._graphs: dict[str, Any] = {
            name: torch.compile(_Encoder(model, name), dynamic=False, **options) for name in ("frames", "pixels")
        }
        self._aot: dict[str, Any] = {}  # warmup_s key -> AOTInductor package
        self.warmup_s: dict[str, float] = {}

    def __call__(self, frame: Any, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Visual tokens ``[1, N, H]`` of one uint8 ``HxWx3`` frame (or preprocessed pixels)."""
        at_size = isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.shape == (self.size, self.size, 3)
        if at_size:
            name, x = "frames", torch.as_tensor(frame, device=self.model.device)
        else:
            name, x = "pixels", self.model.pixel_values(frame)
        # a package takes exactly the inputs it was exported with: one with and one without condition
        key = f"vision {name}" + ("" if condition is not None else " (no condition)")
        inputs = (x,) if condition is None else (x, condition)
        if key in self.warmup_s:  # this graph's one shape was compiled before
            return self._aot[key](*inputs) if self.ahead_of_time else warm_call(self._graphs[name], *inputs)
        t0 = time.perf_counter()
        if self.ahead_of_time:
            self._aot[key] = aot_compile(_Encoder(self.model, name), inputs)
            out = self._aot[key](*inputs)
        else:
            graph = self._graphs[name]
            with compiling(x.device.type):
                out = graph(*inputs)
        self.warmup_s[key] = time.perf_counter() - t0
        return out

    def warm_up(self, condition: torch.Tensor | None = None) -> None:
        """Compile both graphs on black frames: one at the model's size, one a pixel larger."""
        for side in (self.size, self.size + 1):
            self(np.zeros((side, side, 3), dtype=np.uint8), condition)
