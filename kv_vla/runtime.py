"""The episode runtime: one VLA, one KV cache that lives for the whole episode.

Longer than ~400 lines on purpose: reset, step, the compiled step and resolving the cache settings
at each episode start share the episode's state (prompt layout, pinned tokens, the cache).

``reset(instruction)`` prefills OpenVLA's prompt and pins it; every ``step(image)`` prefills the
frame's visual tokens into the *same* cache at the episode's next absolute positions, greedily
decodes ``action_dim`` action tokens (argmax restricted to the 256 action ids, each fed back so the
step's tokens end up in the cache), lets the cache policy evict old chunks, and returns the
un-normalised action with timings and cache statistics.

The runtime drives the language model itself (``inputs_embeds``, ``past_key_values``, explicit
``position_ids``): a model's stock ``forward``/``generate`` cannot continue an episode cache, and
OpenVLA's silently ignores the image on newer transformers.

Per-step token layout (what one chunk of the default size holds)::

    [image tokens (N)] [action tokens (action_dim)]
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kv_vla import settings
from kv_vla.cache.positions import PositionRangeWarning, position_limit, position_range_note
from kv_vla.model.action_tokenizer import action_stats, unnormalize_actions
from kv_vla.model.base import VLABackbone
from kv_vla.model.image import validate_image
from kv_vla.model.prompt import build_prompt


@dataclass
class StepResult:
    """What one control step returns.

    Attributes:
        action: float32 ``[action_dim]``, un-normalised and clipped.
        timings_ms: wall time of ``vision``, ``prefill``, ``decode``, ``cache`` (eviction) and ``total``.
        cache_stats: the cache's own :class:`kv_vla.cache.CacheStats` after this step's eviction.
        action_token_ids: int64 ``[action_dim]`` vocabulary ids that were decoded.
        normalized_action: float32 ``[action_dim]`` bin centres in ``[-1, 1]`` before un-normalisation.
        step_index: 0-based index of this step in the episode.
        max_position_id: the largest position id the model has seen this episode (with the
            backbone's own offset): compare it with ``max_position_embeddings``.
    """

    action: np.ndarray
    timings_ms: dict[str, float]
    cache_stats: Any
    action_token_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    normalized_action: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    step_index: int = 0
    max_position_id: int = -1


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


GATE_FILE = "gate.safetensors"


def shipped_gate(model_dir: str | Path) -> Path | None:
    """The trained gate saved beside a checkpoint (``MODEL/gate.safetensors``), if there is one.

    One convention for every entry point (ROS node, evaluation, demo): a model folder carries the
    gate trained for it, because a gate reads that model's key/value statistics and fits no other.
    """
    path = Path(model_dir) / GATE_FILE
    return path if path.exists() else None


class EpisodeRuntime:
    """Runs a :class:`~kv_vla.model.base.VLABackbone` step by step over one episode cache."""

    def __init__(
        self,
        model: VLABackbone,
        cache_config: Any = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        unnorm_key: str | None = None,
        gate: Any = None,
        compile: bool = False,
    ) -> None:
        """
        Args:
            model: the VLA (compact model, HF adapter or OpenVLA wrapper); moved to ``device``/``dtype``.
            cache_config: an ``EpisodeCacheConfig`` (``chunk_size`` 0: one control step, resolved at
                every ``reset``); None means the evaluated setting
                (:meth:`~kv_vla.cache.EpisodeCacheConfig.evaluated`: the gate's own settings on top of
                the ``kv_vla.settings`` defaults).
            device: torch device; ``dtype`` defaults to bf16 on CUDA and float32 elsewhere.
            unnorm_key: which dataset's statistics un-normalise actions (may be omitted when the
                model carries a single dataset, as in OpenVLA).
            gate: a trained ``ChunkGate`` for the ``gated`` policy (None: the cache's default gate).
            compile: run the decoder step (and the vision encoder) under ``torch.compile``; needs
                ``storage='static'`` and a policy without the attention probe. The first step of each
                shape compiles (``warmup_s``).
        """
        self.device = torch.device(device)
        self.dtype = dtype if dtype is not None else _default_dtype(self.device)
        if isinstance(model, torch.nn.Module):
            model = model.to(device=self.device, dtype=self.dtype)
            model.eval()
        self.model = model
        #: Tokens one control step adds (the default chunk size); with ``prompt_in_step`` backbones it
        #: also counts the instruction and is final only after ``reset``.
        self.step_tokens = int(model.num_image_tokens + model.action_dim)
        self._prompt_in_step = bool(getattr(model, "prompt_in_step", False))
        self._step_text: torch.Tensor | None = None
        #: the cache settings as asked for (``chunk_size`` 0 = one control step); see ``cache_config``
        if cache_config is None:
            from kv_vla.cache import EpisodeCacheConfig

            cache_config = EpisodeCacheConfig.evaluated(gate)
        self.requested_config = cache_config.validate()
        self.unnorm_key = unnorm_key
        self._stats = action_stats(model.norm_stats, unnorm_key)
        if self._stats["q01"].shape[0] != model.action_dim:
            raise ValueError(
                f"norm_stats have {self._stats['q01'].shape[0]} dims, model has {model.action_dim}"
            )
        lo = np.where(self._stats["mask"], np.minimum(self._stats["q01"], self._stats["q99"]), -1.0)
        hi = np.where(self._stats["mask"], np.maximum(self._stats["q01"], self._stats["q99"]), 1.0)
        self.action_low, self.action_high = lo.astype(np.float32), hi.astype(np.float32)
        # each bin's value and its un-normalised, clipped action per dim, computed once: a step
        # looks its action up (the same float ops as un-normalising it, without their per-step cost)
        tok = model.action_tokenizer
        self._bin_values = tok.decode_bin_index(np.arange(tok.n_bins)).astype(np.float32)
        grid = np.repeat(self._bin_values[:, None], model.action_dim, axis=1)
        actions = unnormalize_actions(grid, model.norm_stats, unnorm_key)
        self._bin_actions = np.clip(actions, self.action_low, self.action_high).astype(np.float32)
        self._dims = np.arange(model.action_dim)
        self.gate = gate
        self.cache: Any = None
        self.instruction: str | None = None
        self.step_index = 0
        self._broken: str | None = None
        self._condition: torch.Tensor | None = None  # instruction condition (highlight; set by reset)
        #: ``[action_dim, n_bins]`` float32 logits over the action bins of the last step's decoded dims.
        self.last_action_logits: torch.Tensor | None = None
        self._act_begin = tok.action_token_begin_idx
        self._act_end = tok.vocab_size
        #: warn (PositionRangeWarning) once per episode when positions pass max_position_embeddings;
        #: the ROS node turns this off and reports it through its logger and diagnostics instead
        self.warn_positions = True
        self.position_note: str | None = None  # why this episode's positions are out of range
        self.compile = False
        self._decoder: Any = None  # CompiledDecoder when compiled
        self._embed_image = model.embed_image
        if compile:
            self.set_compile(True)

    def set_compile(self, on: bool) -> None:
        """Run later steps compiled (``on``) or eager; compiling needs ``storage='static'``.

        Raises ValueError (and changes nothing) when the cache config cannot be compiled.
        """
        from kv_vla.cache.storage.compiled import CompiledDecoder
        from kv_vla.model.compiled_vision import CompiledImageEncoder

        if not on:
            self.compile, self._decoder, self._embed_image = False, None, self.model.embed_image
            return
        self._check_compile(self.cache_config)
        self.compile = True
        mode = "reduce-overhead" if self.device.type == "cuda" else None  # a CUDA graph on GPU
        self._decoder = CompiledDecoder(self.model.language_model, mode=mode)
        if callable(getattr(self.model, "encode_pixels", None)) and callable(getattr(self.model, "pixel_values", None)):
            self._embed_image = CompiledImageEncoder(self.model, mode=mode)

    def _check_compile(self, config: Any) -> None:
        from kv_vla.cache import POLICIES

        if config.storage != "static":
            raise ValueError(
                "compile: the compiled step needs storage='static' (the dynamic storage changes shapes "
                f"every step); got storage={config.storage!r}"
            )
        if POLICIES[config.policy].needs_attention:
            raise ValueError(
                f"compile: policy {config.policy!r} reads attention through the probe, which cannot run "
                "inside a compiled graph; allowed values: a policy without the probe, or compile=False"
            )

    @torch.inference_mode()
    def warm_up(self, instruction: str = "touch the red cube") -> float:
        """Compile every shape the compiled step can meet, before the first episode; the seconds spent.

        Runs one step of a throwaway episode on a black frame (compiling the vision encoder, for frames
        at the model's size and at any other, and the
        first decoder shape), then :meth:`CompiledDecoder.precompile` for every other attended span,
        and drops that episode: call :meth:`reset` next. Without it a span compiles the first time a
        real step reaches it, stalling that step (seconds on a CPU). Eager runtimes return 0.
        """
        if self._decoder is None:
            return 0.0
        if self.cache is not None and self.step_index > 0:
            raise RuntimeError("warm_up: an episode is running; warm up before the first episode")
        t0 = time.perf_counter()
        self.reset(instruction)
        size = int(self.model.image_size)
        self.step(np.zeros((size, size, 3), dtype=np.uint8))
        warm_vision = getattr(self._embed_image, "warm_up", None)
        if callable(warm_vision):  # the graph for frames of another size than the model's
            warm_vision(self._condition)
        # down to the shortest prompt a later episode can pin (a one-word instruction)
        self._decoder.precompile(self.cache, min_held=self.prompt_layout(settings.SHORTEST_INSTRUCTION)[0])
        self.cache = None
        return time.perf_counter() - t0

    @property
    def warmup_s(self) -> dict[str, float]:
        """Seconds the first call of each compiled shape took (empty when not compiled)."""
        if self._decoder is None:
            return {}
        shapes = {f"decoder q={q} span={a} slots={s}": t for (q, a, s), t in self._decoder.warmup_s.items()}
        return {**getattr(self._embed_image, "warmup_s", {}), **shapes}

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        cache_config: Any = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        gate_path: str | Path | None = None,
        unnorm_key: str | None = None,
        compile: bool = False,
        trust_remote_code: bool = False,
    ) -> EpisodeRuntime:
        """Load a checkpoint folder and its trained gate into a runtime.

        A compact VLA folder (``model_type`` ``kv_vla_compact``) loads natively; a folder with
        remote code (``auto_map``, e.g. OpenVLA) goes through :func:`kv_vla.model.openvla.load_openvla`
        and only with ``trust_remote_code`` (it runs Python files from the folder). ``gate_path``
        None takes the gate saved beside the model (:func:`shipped_gate`), if there is one.
        """
        import json

        from kv_vla.model.compact import CompactVLA, CompactVLAConfig

        cfg_file = Path(path) / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"no checkpoint (config.json) in {path}")
        meta = json.loads(cfg_file.read_text())
        if meta.get("model_type") == CompactVLAConfig.model_type:
            model: Any = CompactVLA.from_pretrained(path)
        elif "auto_map" in meta:
            from kv_vla.model.openvla import load_openvla

            model = load_openvla(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        else:
            raise ValueError(
                f"{path}: model_type {meta.get('model_type')!r} is neither a compact VLA nor a remote-code "
                "(OpenVLA) checkpoint; wrap other Hugging Face VLMs with kv_vla.model.adapters.adapt()"
            )
        gate = None
        if gate_path is None:
            gate_path = shipped_gate(path)
        if gate_path is not None:
            from kv_vla.cache import ChunkGate

            gate = ChunkGate.load(gate_path)
        return cls(
            model,
            cache_config=cache_config,
            device=device,
            dtype=dtype,
            unnorm_key=unnorm_key,
            gate=gate,
            compile=compile,
        )

    # ---- settings -------------------------------------------------------------------------------
    @property
    def cache_config(self) -> Any:
        """The cache config in force: ``requested_config`` with one control step in tokens.

        On a ``prompt_in_step`` backbone a step also holds the instruction, so its length is final
        only after ``reset``.
        """
        return self.requested_config.resolve(self.step_tokens)

    def update_cache_config(self, **changes: Any) -> None:
        """Validate and apply cache settings (``kv_vla.settings`` names); they govern the next
        eviction decision and later episodes. ``chunk_size`` 0 means one control step.

        Raises ValueError (naming the knob and the allowed values) and changes nothing if refused.
        """
        requested = self.requested_config.replace(**changes)
        resolved = requested.resolve(self.step_tokens)
        if self.compile:
            self._check_compile(resolved)
        if self.cache is not None and hasattr(self.cache, "update_config"):
            old = self.cache.config
            diff = {k: v for k, v in vars(resolved).items() if getattr(old, k) != v}
            if diff:
                self.cache.update_config(**diff)
        self.requested_config = requested
        if self.cache is not None:
            self._sync_attention_probe()

    def prompt_layout(self, instruction: str) -> tuple[int, int]:
        """``(pinned tokens, tokens per control step)`` an episode with ``instruction`` would have
        (tokenising only). On a ``prompt_in_step`` backbone only BOS is pinned and every step
        repeats the rest of the prompt."""
        n_prompt = int(self.model.prompt_ids(build_prompt(instruction)).shape[1])
        n_step = int(self.model.num_image_tokens + self.model.action_dim)
        return (1, n_step + n_prompt - 1) if self._prompt_in_step else (n_prompt, n_step)

    def check_prompt(self, prompt_tokens: int, step_tokens: int | None = None, config: Any = None) -> None:
        """Refuse a prompt the budget cannot hold beside the recent chunks and the open chunk.

        The one rule for instruction length: ``max_instruction_chars`` only bounds the message; the
        budget (``max_tokens``) bounds its prompt in tokens, and this refusal gives the numbers.
        """
        config = config or self.requested_config
        config.resolve(self.step_tokens if step_tokens is None else step_tokens).check_prompt(prompt_tokens)

    # ---- episode --------------------------------------------------------------------------------
    def _sync_attention_probe(self, policy: str | None = None) -> None:
        """Attention-scored policies need the probing attention (outputs unchanged); others don't.

        The model's own attention setting is the source of truth (a model may be shared by runtimes).
        """
        from kv_vla.cache import POLICIES, disable_attention_probe, enable_attention_probe, is_probing

        lm = self.model.language_model
        needs = bool(POLICIES[policy or self.requested_config.policy].needs_attention)
        has = is_probing(lm)
        if needs and not has:
            enable_attention_probe(lm)
        elif has and not needs:
            disable_attention_probe(lm)

    def _new_cache(self, config: Any) -> Any:
        from kv_vla.cache import EpisodeCache

        self._sync_attention_probe(config.policy)
        cache = EpisodeCache(config, self.model.language_model.config)
        from kv_vla.cache.policies.gated import GatedPolicy

        # the trained gate serves every gate-driven policy (``gated`` and ZipVL's ``gated_tiered``)
        if self.gate is not None and isinstance(getattr(cache, "policy", None), GatedPolicy):
            cache.set_gate(self.gate)
        return cache

    def _lm(self, embeds: torch.Tensor, cache: Any = None, n_logits: int = 1) -> torch.Tensor:
        """Append ``embeds`` to the cache at the next absolute positions; the action logits of the
        last position (``[n_bins]``), or of the last ``n_logits`` positions (``[n_logits, n_bins]``)."""
        cache = self.cache if cache is None else cache
        start = self.model.position_offset + cache.get_seq_length()
        positions = torch.arange(start, start + embeds.shape[1], device=self.device, dtype=torch.long)[None]
        if self._decoder is not None:
            logits = self._decoder(cache, embeds.to(self.dtype), positions, n_logits)
        else:
            logits = self.model.language_model(
                inputs_embeds=embeds.to(self.dtype),
                position_ids=positions,
                attention_mask=cache.attention_mask(embeds.shape[1], self.dtype, self.device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=n_logits,
            ).logits
        if n_logits > 1:
            return logits[0, -n_logits:, self._act_begin : self._act_end].float()
        return logits[0, -1, self._act_begin : self._act_end].float()

    @torch.inference_mode()
    def reset(self, instruction: str, **cache_changes: Any) -> None:
        """Start an episode: fresh cache, prefill the prompt, pin it (never evicted).

        ``cache_changes`` (``kv_vla.settings`` names) apply from this episode on, checked together
        with this instruction's prompt. The new episode (and the changes) replace the old ones only
        once its prompt is cached and pinned, so a refused instruction or cache configuration leaves
        the previous episode and settings as they were.
        """
        requested = self.requested_config.replace(**cache_changes) if cache_changes else self.requested_config
        prompt = build_prompt(instruction)
        step_text = None
        if self._prompt_in_step:
            # OpenVLA's own layout, per step: [image][prompt][actions] after a pinned BOS, so the
            # first step sees exactly the sequence the checkpoint was trained on.
            ids = self.model.prompt_ids(prompt)
            prefix, step_text = self.model.embed_tokens(ids[:, :1]), self.model.embed_tokens(ids[:, 1:])
            n_step = int(self.model.num_image_tokens + self.model.action_dim + step_text.shape[1])
        else:
            prefix = self.model.embed_prompt(prompt)
            n_step = int(self.model.num_image_tokens + self.model.action_dim)
        self.check_prompt(int(prefix.shape[1]), n_step, requested)
        condition_of = getattr(self.model, "instruction_condition", None)
        condition = condition_of(self.model.prompt_ids(prompt)) if condition_of is not None else None
        # "one control step" is resolved here, once per episode; an explicit chunk size is kept
        cache = self._new_cache(requested.resolve(n_step))
        self._lm(prefix, cache)
        cache.pin_prefix()
        self.requested_config = requested
        self.cache = cache
        self._condition = condition  # conditions this episode's frames (None: no highlight)
        self.step_tokens = n_step
        self._step_text = step_text
        self.instruction = instruction
        self.step_index = 0
        self.position_note = None
        self.last_action_logits = None
        self._broken = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def step(self, image: np.ndarray) -> StepResult:
        """One control step on an RGB frame (uint8 ``HxWx3``; ``HxWx4`` drops alpha, ``HxW`` is grey).

        A frame that fails validation raises ValueError before anything is written to the cache, so
        the episode continues as if the call never happened.
        """
        if self.cache is None:
            raise RuntimeError("call reset(instruction) before step(image)")
        if self._broken is not None:
            raise RuntimeError(f"episode is unusable after an internal error ({self._broken}); call reset()")
        frame = validate_image(image)
        self._sync_attention_probe()  # cheap; keeps a model shared by several runtimes right
        timings: dict[str, float] = {}
        self._sync()
        t0 = time.perf_counter()
        try:
            if self._condition is None:
                img = self._embed_image(frame)
            else:
                img = self._embed_image(frame, condition=self._condition)
            self._sync()
            t1 = time.perf_counter()
            if self._step_text is not None:
                img = torch.cat([img, self._step_text.to(img.dtype)], dim=1)
            n_act = self.model.action_dim
            queries = self._action_queries()
            if queries is not None:
                # parallel decoding: frame and action slots in one forward, every dim read at once
                all_logits = self._lm(torch.cat([img, queries.to(img.dtype)], dim=1), n_logits=n_act).cpu()
                ids = torch.argmax(all_logits, dim=-1) + self._act_begin
                self._sync()
                t2 = t3 = time.perf_counter()
            else:
                logits = self._lm(img)
                self._sync()
                t2 = time.perf_counter()
                all_logits = torch.empty((n_act, self._act_end - self._act_begin), dtype=torch.float32)
                ids = torch.empty((n_act,), dtype=torch.long)
                for d in range(n_act):
                    all_logits[d] = logits.cpu()
                    tok = int(torch.argmax(logits)) + self._act_begin
                    ids[d] = tok
                    emb = self.model.embed_tokens(torch.tensor([[tok]], device=self.device))
                    logits = self._lm(emb)  # the last one only writes the final action token into the cache
                self._sync()
                t3 = time.perf_counter()
            self._end_step()
            self._sync()
            t4 = time.perf_counter()
        except Exception as exc:
            self._broken = f"{type(exc).__name__}: {exc}"
            raise
        bins = ids.numpy() - self._act_begin
        normalized, action = self._bin_values[bins], self._bin_actions[bins, self._dims]
        self.last_action_logits = all_logits
        timings.update(
            vision=(t1 - t0) * 1e3,
            prefill=(t2 - t1) * 1e3,
            decode=(t3 - t2) * 1e3,
            cache=(t4 - t3) * 1e3,
            total=(time.perf_counter() - t0) * 1e3,
        )
        stats = self.cache.stats()
        max_position_id = int(self.model.position_offset + stats.max_position)  # a running max
        res = StepResult(
            action=action,
            timings_ms=timings,
            cache_stats=stats,
            action_token_ids=ids.numpy(),
            normalized_action=normalized,
            step_index=self.step_index,
            max_position_id=max_position_id,
        )
        self.step_index += 1
        if self.position_note is None:
            self._check_position_range(max_position_id)
        return res

    @property
    def position_limit(self) -> int | None:
        """The language model's ``max_position_embeddings`` (None where its config states none)."""
        return position_limit(self.model.language_model.config)

    def _check_position_range(self, max_position_id: int) -> None:
        """Note (and warn, once per episode) when positions leave the range the model was trained on."""
        note = position_range_note(max_position_id, self.position_limit, str(self.requested_config.positions))
        if note is None:
            return
        self.position_note = note
        if self.warn_positions:
            warnings.warn(note, PositionRangeWarning, stacklevel=4)  # the caller of step()

    def _action_queries(self) -> torch.Tensor | None:
        """The backbone's parallel-decoding slot embeddings, or None for autoregressive decoding."""
        get = getattr(self.model, "action_query_embeds", None)
        return get() if callable(get) else None

    def _end_step(self) -> None:
        """Let the cache policy act on the chunks completed by this step."""
        evict = getattr(self.cache, "maybe_evict", None)
        if callable(evict):
            evict()

    @property
    def norm_stats(self) -> Mapping[str, Any]:
        return self.model.norm_stats
