"""Run an OpenVLA (Prismatic) checkpoint through the episode runtime.

Expected checkpoint directory (as published for ``openvla/openvla-7b``; loaded with
``trust_remote_code`` because transformers has no native OpenVLA)::

    config.json                 OpenVLAConfig: text_config (Llama-2), n_action_bins=256,
                                pad_to_multiple_of=64, norm_stats={unnorm_key: {"action": {q01, q99, mask, ...}}},
                                use_fused_vision_backbone, image_sizes, auto_map -> the two .py files
    configuration_prismatic.py  remote code (config classes)
    modeling_prismatic.py       remote code: OpenVLAForActionPrediction with attributes
                                  vision_backbone(pixel_values) -> patch features [B, 256, D]
                                  projector(patches) -> [B, 256, 4096]
                                  language_model: LlamaForCausalLM (vocab padded 32000 -> 32064)
    preprocessor_config.json    image processor: input_sizes, means, stds (one per fused backbone:
                                DINOv2 ImageNet stats, SigLIP 0.5/0.5), resize_strategy
    tokenizer.json / tokenizer.model, special_tokens_map.json, ...
    model-0000x-of-0000y.safetensors

What the wrapper relies on, mirroring ``modeling_prismatic.py``: the three attributes above; that
the action ids are the last ``n_action_bins`` ids of the *unpadded* vocabulary
(``text_config.vocab_size - pad_to_multiple_of``, i.e. 31744..31999 for Llama-2); the fused
backbone takes the two normalisations concatenated on the channel axis (6 channels); and
``predict_action`` appends token 29871 (an empty "▁" piece) to the prompt when it is missing.

Honesty note: this code path is tested on a tiny random model with the same module structure
(see ``tests/model/test_model_openvla.py``); it was NOT run on the real 7B checkpoint (not available
offline here), and OpenVLA's remote code targets transformers 4.40, so loading it under 5.x may
need the remote code patched. OpenVLA was trained on single frames
(``[BOS][image][prompt][actions]``), never on episodes: with history in its context its actions
are untested, and it would need fine-tuning on episodes before history-conditioned actions mean
anything. By default (``prompt_in_step``) the runtime therefore repeats OpenVLA's own layout per
step (``[BOS]`` pinned, then ``[image][prompt][actions]`` per step), so the first step is exactly
the input of OpenVLA's ``predict_action`` (tested against that composition on the mirror) and
later steps add history in front of the same block. Resizing uses bilinear-antialiased torch
interpolation, not PIL, so pixels differ slightly from OpenVLA's processor.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kv_vla.model.action_tokenizer import ActionTokenizer
from kv_vla.model.base import PromptEmbeddingMixin
from kv_vla.model.image import frames_to_pixel_values

#: Llama-2 SentencePiece id of the empty "▁" piece OpenVLA's ``predict_action`` appends to the prompt.
OPENVLA_PROMPT_SUFFIX_ID = 29871
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)


class OpenVLABackbone(PromptEmbeddingMixin, nn.Module):
    """A Prismatic/OpenVLA model seen as a :class:`~kv_vla.model.base.VLABackbone`.

    Args:
        prismatic: the loaded ``OpenVLAForActionPrediction`` (or any module with ``vision_backbone``,
            ``projector``, ``language_model`` and a ``config`` carrying ``norm_stats``).
        tokenizer: the checkpoint's tokenizer (BOS prepended), or a function ``text -> ids``.
        image_size: square input size of the vision backbone(s) (224 for OpenVLA-7B).
        means, stds: one normalisation per backbone; two entries mean a fused backbone whose pixel
            tensors are concatenated on the channel axis.
        prompt_suffix_id: token appended to the prompt when missing (OpenVLA: 29871); None disables.
        prompt_in_step: True (default) runs OpenVLA's own layout: BOS pinned, then per step
            ``[image][prompt][actions]``, so the first step is exactly the checkpoint's
            ``predict_action`` input; False uses the compact model's layout (prompt once, pinned).
    """

    position_offset = 0

    def __init__(
        self,
        prismatic: nn.Module,
        tokenizer: Any,
        image_size: int = 224,
        means: Sequence[Sequence[float]] = (IMAGENET_MEAN, SIGLIP_MEAN),
        stds: Sequence[Sequence[float]] = (IMAGENET_STD, SIGLIP_STD),
        prompt_suffix_id: int | None = OPENVLA_PROMPT_SUFFIX_ID,
        prompt_in_step: bool = True,
    ) -> None:
        super().__init__()
        for attr in ("vision_backbone", "projector", "language_model", "config"):
            if not hasattr(prismatic, attr):
                raise ValueError(f"not a Prismatic/OpenVLA model: missing attribute {attr!r}")
        if len(means) != len(stds) or not means:
            raise ValueError("means and stds must be non-empty and of equal length (one per backbone)")
        self.prismatic = prismatic
        self.vision_backbone = prismatic.vision_backbone
        self.projector = prismatic.projector
        self.language_model = prismatic.language_model
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.means = [tuple(m) for m in means]
        self.stds = [tuple(s) for s in stds]
        self.prompt_suffix_id = prompt_suffix_id
        self.prompt_in_step = bool(prompt_in_step)
        cfg = prismatic.config
        norm_stats = _cfg_get(cfg, "norm_stats")
        if not norm_stats:
            raise ValueError("OpenVLA config has no norm_stats: cannot un-normalise actions")
        self.norm_stats: dict[str, Any] = dict(norm_stats)
        n_bins = int(_cfg_get(cfg, "n_action_bins", 256))
        text_cfg = _cfg_get(cfg, "text_config") or self.language_model.config
        padded = int(_cfg_get(text_cfg, "vocab_size"))
        pad = int(_cfg_get(cfg, "pad_to_multiple_of", 0) or 0)
        # OpenVLA: vocab_size = text_config.vocab_size - pad_to_multiple_of (the unpadded tokenizer size)
        self.action_tokenizer = ActionTokenizer(padded - pad, n_bins=n_bins)
        first = next(iter(self.norm_stats.values()))
        self.action_dim = len(first.get("action", first)["q01"])
        self._num_image_tokens: int | None = None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def num_image_tokens(self) -> int:
        if self._num_image_tokens is None:
            with torch.inference_mode():
                dummy = np.zeros((self.image_size, self.image_size, 3), dtype=np.uint8)
                self._num_image_tokens = int(self.embed_image(dummy).shape[1])
        return self._num_image_tokens

    def prompt_ids(self, text: str) -> torch.Tensor:
        if callable(self.tokenizer) and not hasattr(self.tokenizer, "convert_tokens_to_ids"):
            ids = list(self.tokenizer(text))
        else:
            ids = list(self.tokenizer(text).input_ids)
        if self.prompt_suffix_id is not None and (not ids or ids[-1] != self.prompt_suffix_id):
            ids.append(self.prompt_suffix_id)
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def pixel_values(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """One normalisation per backbone, concatenated on channels (6 channels for the fused DINO+SigLIP)."""
        parts = [
            frames_to_pixel_values(image, self.image_size, m, s, device=self.device, dtype=self.dtype)
            for m, s in zip(self.means, self.stds)
        ]
        return torch.cat(parts, dim=1)

    def embed_image(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(image, np.ndarray) or image.dtype == torch.uint8:
            image = self.pixel_values(image)
        patches = self.vision_backbone(image)
        return self.projector(patches)


def read_preprocessor_config(path: str | Path) -> dict[str, Any]:
    """``image_size``, ``means``, ``stds`` from a Prismatic ``preprocessor_config.json`` (defaults: OpenVLA-7B)."""
    out: dict[str, Any] = {
        "image_size": 224,
        "means": [IMAGENET_MEAN, SIGLIP_MEAN],
        "stds": [IMAGENET_STD, SIGLIP_STD],
    }
    f = Path(path) / "preprocessor_config.json"
    if not f.exists():
        return out
    cfg = json.loads(f.read_text())
    cfg = cfg.get("image_processor", cfg)
    if "input_sizes" in cfg:
        out["image_size"] = int(cfg["input_sizes"][0][-1])
    if "means" in cfg and "stds" in cfg:
        out["means"], out["stds"] = cfg["means"], cfg["stds"]
    if cfg.get("use_fused_vision_backbone") is False:
        out["means"], out["stds"] = out["means"][:1], out["stds"][:1]
    return out


_AUTO_KEYS = ("AutoModelForVision2Seq", "AutoModelForImageTextToText", "AutoModelForCausalLM")


def load_openvla(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> OpenVLABackbone:
    """Load an OpenVLA checkpoint directory (local files only) as a backbone.

    OpenVLA's classes are Python files inside the folder (``auto_map``), so loading it runs that
    code: refused unless ``trust_remote_code`` (the ``kv_vla.settings`` knob of that name) is set.

    The model's own ``forward``/``predict_action`` are never called: the runtime drives
    ``vision_backbone``, ``projector`` and ``language_model`` itself. Not verified on the real 7B
    checkpoint (see the module docstring).
    """
    from transformers import AutoTokenizer
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no OpenVLA checkpoint (config.json) in {path}")
    auto_map = json.loads((path / "config.json").read_text()).get("auto_map", {})
    # OpenVLA registers itself as AutoModelForVision2Seq, which transformers 5 no longer has: resolve
    # the remote class from auto_map directly instead of through an Auto class.
    key = next((k for k in _AUTO_KEYS if k in auto_map), None)
    if key is None:
        raise ValueError(
            f"{path}/config.json has no auto_map entry for any of {_AUTO_KEYS} (remote code missing?)"
        )
    if not trust_remote_code:
        raise ValueError(
            f"trust_remote_code: {path} is a remote-code checkpoint (auto_map {auto_map[key]!r}); loading it "
            "runs Python files from that folder. Set trust_remote_code=True (node parameter / "
            "--trust-remote-code) only for a folder you trust"
        )
    cls = get_class_from_dynamic_module(auto_map[key], str(path), local_files_only=True)
    load_kw: dict[str, Any] = {"trust_remote_code": True, "local_files_only": True}
    if dtype is not None:
        load_kw["dtype"] = dtype
    prismatic = cls.from_pretrained(path, **load_kw).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    pre = read_preprocessor_config(path)
    pre.update(kwargs)
    return OpenVLABackbone(prismatic, tokenizer, **pre).eval()
