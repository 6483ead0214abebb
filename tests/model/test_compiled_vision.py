"""The compiled vision encoder equals the eager ``embed_image``, whether the frame is normalised
inside its graph (a frame at the model's size) or resized eagerly first (any other size)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from compile_counts import compiled_graphs

from kv_vla.model import CompactVLA
from kv_vla.model.compiled_vision import CompiledImageEncoder

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "compact-vla"


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(), reason="no shipped model")
@pytest.mark.parametrize("ahead_of_time", [True, False], ids=["aot", "dynamo"])
def test_compiled_vision_equals_eager_for_frames_at_and_off_the_model_size(monkeypatch, ahead_of_time):
    from kv_vla.cache.storage import compiled

    monkeypatch.setattr(compiled, "CPU_INDUCTOR_CONFIG", {"freezing": True})  # no GEMM autotune: faster
    torch._dynamo.reset()
    model = CompactVLA.from_pretrained(SHIPPED).eval()
    condition = model.instruction_condition(model.prompt_ids("touch the red cube"))
    encoder = CompiledImageEncoder(model, ahead_of_time=ahead_of_time)
    size = model.image_size
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        encoder.warm_up(condition)
        assert set(encoder.warmup_s) == {"vision frames", "vision pixels"}
        graphs = compiled_graphs()
        for side in (size, size, 48, 96):
            frame = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
            got, want = encoder(frame, condition), model.embed_image(frame, condition=condition)
            # inductor fuses the normalisation and reorders the convolutions' sums: a stated bound
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert compiled_graphs() == graphs, "a frame after the warm-up compiled"
