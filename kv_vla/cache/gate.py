"""The recurrent chunk gate: reads chunk summaries in episode order and writes a utility per chunk.

Interface for online use (the cache's ``gated`` policy) and for training (issue 5):

* ``gate.step(summary[F], state) -> (utility, state)``: one recurrent step per completed chunk.
* ``gate(summaries[T, F]) -> utilities[T]`` (or ``[B, T, F] -> [B, T]``): the same computation over
  a recorded episode, differentiable; ``EpisodeCache.chunk_summaries()`` gives the ``[T, F]`` input.

Each utility is written once, when its chunk completes, from the state after reading that chunk
(a causal write gate; older chunks are not re-scored). Summaries are those of
:mod:`kv_vla.cache.summary`: per layer, mean and std of the chunk's keys and values
(``2 * (head_dim + value_dim)`` numbers, the widths actually cached), plus the attention mass the
chunk received (when probed) and its index in the episode.
A shared per-layer projection keeps the gate small for deep models (a 7B model's 32 layers give
16 386 input numbers, projected to ``32 * proj_dim``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kv_vla.atomic import atomic_write, atomic_write_text
from kv_vla.cache.summary import N_EXTRA, check_summary_keys, kv_widths, summary_dim


@dataclass
class GateConfig:
    """Shape of a :class:`ChunkGate` (saved as JSON beside the weights)."""

    num_layers: int
    head_dim: int  # width of a cached key head
    hidden_size: int = 64
    proj_dim: int = 16
    cell: str = "gru"
    value_dim: int | None = None  # width of a cached value head (None: head_dim; MLA differs)
    #: keys the summaries are taken from: "rotated" (as cached, RoPE applied: a chunk's summary
    #: depends on its position) or "unrotated" (RoPE undone first: the same chunk content gives the
    #: same summary at any position; RoPE models only)
    summary_keys: str = "rotated"

    def __post_init__(self) -> None:
        if self.cell not in ("gru", "lstm"):
            raise ValueError(f"cell: unknown recurrent cell {self.cell!r}; allowed values: ['gru', 'lstm']")
        check_summary_keys(self.summary_keys)
        if self.value_dim is None:
            self.value_dim = self.head_dim
        for name in ("num_layers", "head_dim", "hidden_size", "proj_dim", "value_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {value!r} is not allowed; allowed values: an integer >= 1")

    @property
    def feature_dim(self) -> int:
        """Length of one chunk summary."""
        return summary_dim(self.num_layers, self.head_dim, self.value_dim)

    @property
    def layer_feature_dim(self) -> int:
        """Summary numbers per layer: mean and std of keys and values."""
        return 2 * (self.head_dim + self.value_dim)


def check_gate_settings(values: Any, where: Any) -> dict[str, Any]:
    """The ``settings`` of a gate file, refused (ValueError naming the file) unless every entry is a
    valid cache setting of :mod:`kv_vla.settings`."""
    from kv_vla import settings

    if not isinstance(values, dict):
        raise ValueError(f"{where}: settings must be a JSON object of cache settings")
    for name, value in values.items():
        if name not in settings.CACHE_SETTINGS:
            raise ValueError(
                f"{where}: settings.{name} is not a cache setting; allowed: {list(settings.CACHE_SETTINGS)}"
            )
        reason = settings.check(name, value)
        if reason:
            raise ValueError(f"{where}: settings.{reason}")
    return dict(values)


class ChunkGate(nn.Module):
    """GRU/LSTM gate over chunk summaries producing utilities in [0, 1] (see module docstring)."""

    def __init__(self, config: GateConfig):
        super().__init__()
        self.config = config
        #: cache settings this gate was evaluated with (``kv_vla.settings`` names); they apply when
        #: the gate is used and no setting is given (``EpisodeCacheConfig.evaluated``)
        self.settings: dict[str, Any] = {}
        per_layer = config.layer_feature_dim
        self.norm = nn.LayerNorm(per_layer)
        self.layer_proj = nn.Linear(per_layer, config.proj_dim)
        rnn_cls = nn.GRU if config.cell == "gru" else nn.LSTM
        self.rnn = rnn_cls(
            config.num_layers * config.proj_dim + N_EXTRA, config.hidden_size, batch_first=True
        )
        self.head = nn.Linear(config.hidden_size, 1)

    @classmethod
    def for_model(cls, model_config: Any, seed: int = 0, **kwargs: Any) -> ChunkGate:
        """A freshly (seeded) initialised gate whose ``feature_dim`` matches ``model_config``."""
        getter = getattr(model_config, "get_text_config", None)
        cfg = getter(decoder=True) if callable(getter) else model_config
        key_dim, value_dim = kv_widths(cfg)
        return cls.for_widths(int(cfg.num_hidden_layers), key_dim, value_dim, seed=seed, **kwargs)

    @classmethod
    def for_widths(
        cls, num_layers: int, key_dim: int, value_dim: int, seed: int = 0, **kwargs: Any
    ) -> ChunkGate:
        """A freshly (seeded) initialised gate for ``num_layers`` layers caching heads of these widths."""
        gate_cfg = GateConfig(num_layers=num_layers, head_dim=key_dim, value_dim=value_dim, **kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(gate_cfg)

    @property
    def feature_dim(self) -> int:
        """Length of the summary vector this gate reads."""
        return self.config.feature_dim

    def encode(self, summaries: torch.Tensor) -> torch.Tensor:
        """``[..., F] -> [..., num_layers * proj_dim + extras]`` (per-layer normalise + project)."""
        if summaries.shape[-1] != self.feature_dim:
            raise ValueError(
                f"summaries: last dimension {summaries.shape[-1]} does not match the gate's feature_dim "
                f"{self.feature_dim}"
            )
        param = self.layer_proj.weight
        x = summaries.to(device=param.device, dtype=param.dtype)
        per = self.config.layer_feature_dim
        n_layer_feats = self.config.num_layers * per
        per_layer = x[..., :n_layer_feats].unflatten(-1, (self.config.num_layers, per))
        projected = self.layer_proj(self.norm(per_layer)).flatten(-2)
        return torch.cat([projected, x[..., n_layer_feats:]], dim=-1)

    def forward(self, summaries: torch.Tensor, state: Any = None) -> torch.Tensor:
        """Utilities for a whole episode: ``[T, F] -> [T]`` or ``[B, T, F] -> [B, T]`` (differentiable)."""
        unbatched = summaries.dim() == 2
        x = self.encode(summaries.unsqueeze(0) if unbatched else summaries)
        out, _ = self.rnn(x, state)
        utilities = torch.sigmoid(self.head(out)).squeeze(-1)
        return utilities.squeeze(0) if unbatched else utilities

    @torch.no_grad()
    def step(self, summary: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """One recurrent step for one completed chunk: ``([F], state) -> (utility scalar, state)``."""
        x = self.encode(summary.reshape(1, -1))
        rnn = self.rnn
        weights = (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
        # the single-layer cell kernels directly: nn.GRU/nn.LSTM's per-call Python costs more than the
        # cell (this runs eagerly once per completed chunk, inside the control step); state keeps
        # their [1, 1, H] layout
        if self.config.cell == "gru":
            h = x.new_zeros(1, rnn.hidden_size) if state is None else state[0]
            h = torch.gru_cell(x, h, *weights)
            state = h[None]
        else:
            hc = (x.new_zeros(1, rnn.hidden_size),) * 2 if state is None else (state[0][0], state[1][0])
            h, c = torch.lstm_cell(x, hc, *weights)
            state = (h[None], c[None])
        return torch.sigmoid(self.head(h)).reshape(()), state

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (safetensors weights) and ``path`` with suffix ``.json`` (config), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        meta: dict[str, Any] = asdict(self.config)
        if self.settings:
            meta["settings"] = dict(self.settings)
        atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> ChunkGate:
        """Inverse of :meth:`save`."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        evaluated = meta.pop("settings", {})
        gate = cls(GateConfig(**meta))
        gate.settings = check_gate_settings(evaluated, path.with_suffix(".json"))
        gate.load_state_dict(load_file(str(path), device=str(device)))
        return gate.to(device).eval()
