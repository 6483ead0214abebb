"""The OpenVLA loader's code path on a tiny random model with OpenVLA's module structure.

The mirror below has the attributes the loader relies on (``vision_backbone`` returning patch
features from a fused 6-channel input, ``projector``, ``language_model`` = ``LlamaForCausalLM``
with a vocabulary padded by ``pad_to_multiple_of``, ``norm_stats`` in the config) and is written
out as remote code so that ``load_openvla`` runs its ``trust_remote_code`` path for real.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import transformers.dynamic_module_utils as dmu
from numerics import assert_logits_close

from kv_vla.cache import EpisodeCacheConfig
from kv_vla.model import build_prompt, unnormalize_actions
from kv_vla.model.openvla import OpenVLABackbone, load_openvla
from kv_vla.model.text_tokenizer import DEFAULT_WORDS, build_text_tokenizer
from kv_vla.runtime import EpisodeRuntime

TOK = build_text_tokenizer(DEFAULT_WORDS)
PAD = 64
SUFFIX = TOK.convert_tokens_to_ids("</s>")  # stands in for OpenVLA's 29871 in this tiny vocabulary
NORM_STATS = {
    "bridge_orig": {
        "action": {
            "q01": [-0.1, -0.2, -0.3, 0.0],
            "q99": [0.1, 0.2, 0.3, 1.0],
            "mask": [True, True, True, False],
        }
    },
    "kv_vla_sim": {"action": {"q01": [-1.0] * 4, "q99": [1.0] * 4, "mask": [True] * 4}},
}

CONFIG_SRC = """
from transformers import PretrainedConfig


class TinyPrismaticConfig(PretrainedConfig):
    model_type = "tiny_prismatic"

    def __init__(self, text_config=None, norm_stats=None, n_action_bins=256, pad_to_multiple_of=64,
                 image_size=32, patch_size=8, vision_dim=24, use_fused_vision_backbone=True, **kwargs):
        self.text_config = dict(text_config or {})
        self.norm_stats = norm_stats
        self.n_action_bins = n_action_bins
        self.pad_to_multiple_of = pad_to_multiple_of
        self.image_size = image_size
        self.patch_size = patch_size
        self.vision_dim = vision_dim
        self.use_fused_vision_backbone = use_fused_vision_backbone
        super().__init__(**kwargs)
"""

MODELING_SRC = '''
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from .configuration_tiny_prismatic import TinyPrismaticConfig


class TinyVisionBackbone(nn.Module):
    """Mirrors PrismaticVisionBackbone: fused DINO+SigLIP input (6 channels) -> patch features."""

    def __init__(self, cfg):
        super().__init__()
        self.fused = cfg.use_fused_vision_backbone
        self.featurizer = nn.Conv2d(3, cfg.vision_dim, cfg.patch_size, cfg.patch_size)
        if self.fused:
            self.fused_featurizer = nn.Conv2d(3, cfg.vision_dim, cfg.patch_size, cfg.patch_size)

    def forward(self, pixel_values):
        if not self.fused:
            return self.featurizer(pixel_values).flatten(2).transpose(1, 2)
        a, b = torch.split(pixel_values, [3, 3], dim=1)
        pa = self.featurizer(a).flatten(2).transpose(1, 2)
        pb = self.fused_featurizer(b).flatten(2).transpose(1, 2)
        return torch.cat([pa, pb], dim=2)


class TinyProjector(nn.Module):
    """Mirrors PrismaticProjector (non-fused variant: fc1 -> GELU -> fc2)."""

    def __init__(self, vision_dim, llm_dim):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, llm_dim)
        self.act_fn1 = nn.GELU()
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x):
        return self.fc2(self.act_fn1(self.fc1(x)))


class TinyPrismaticForActionPrediction(PreTrainedModel):
    config_class = TinyPrismaticConfig
    base_model_prefix = "tiny_prismatic"

    def __init__(self, config):
        super().__init__(config)
        text = LlamaConfig(**config.text_config)
        vdim = config.vision_dim * (2 if config.use_fused_vision_backbone else 1)
        self.vision_backbone = TinyVisionBackbone(config)
        self.projector = TinyProjector(vdim, text.hidden_size)
        self.language_model = LlamaForCausalLM(text)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=0.05)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, *args, **kwargs):
        raise RuntimeError("the stock forward must never be used by the runtime")
'''


def _mirror_module(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_prismatic_src")
    (d / "configuration_tiny_prismatic.py").write_text(CONFIG_SRC)
    (d / "modeling_tiny_prismatic.py").write_text(
        MODELING_SRC.replace("from .configuration", "from configuration")
    )
    sys.path.insert(0, str(d))
    try:
        import configuration_tiny_prismatic as c
        import modeling_tiny_prismatic as m
    finally:
        sys.path.remove(str(d))
    return c, m


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    return _mirror_module(tmp_path_factory)


def make_prismatic(mirror, seed=0, fused=True):
    c, m = mirror
    torch.manual_seed(seed)
    cfg = c.TinyPrismaticConfig(
        text_config=dict(
            vocab_size=len(TOK) + PAD,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        norm_stats=NORM_STATS,
        pad_to_multiple_of=PAD,
        use_fused_vision_backbone=fused,
    )
    return m.TinyPrismaticForActionPrediction(cfg).eval()


def backbone(prismatic, fused=True, prompt_in_step=True):
    means = [(0.485, 0.456, 0.406), (0.5, 0.5, 0.5)] if fused else [(0.5, 0.5, 0.5)]
    stds = [(0.229, 0.224, 0.225), (0.5, 0.5, 0.5)] if fused else [(0.5, 0.5, 0.5)]
    return OpenVLABackbone(
        prismatic,
        TOK,
        image_size=32,
        means=means,
        stds=stds,
        prompt_suffix_id=SUFFIX,
        prompt_in_step=prompt_in_step,
    )


def frames(n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 40, 40, 3), dtype=np.uint8)


def test_mapping_action_vocab_and_prompt_suffix(mirror):
    vla = backbone(make_prismatic(mirror))
    # action ids: last 256 ids of the UNPADDED vocabulary (text vocab - pad_to_multiple_of)
    assert vla.action_tokenizer.vocab_size == len(TOK)
    assert vla.action_tokenizer.action_token_begin_idx == len(TOK) - 256
    assert vla.action_dim == 4 and vla.num_image_tokens == 16
    ids = vla.prompt_ids(build_prompt("touch the red cube"))[0].tolist()
    assert ids[0] == TOK.bos_token_id and ids[-1] == SUFFIX and ids[-2] != SUFFIX
    assert vla.pixel_values(frames(1, 0)[0]).shape == (1, 6, 32, 32)


@pytest.mark.parametrize(("fused", "prompt_in_step"), [(True, True), (False, True), (True, False)])
def test_runtime_step_matches_manual_composition(mirror, fused, prompt_in_step):
    """Step 1 with ``prompt_in_step`` is OpenVLA's predict_action input: [BOS][image][prompt][actions]."""
    p = make_prismatic(mirror, fused=fused)
    vla = backbone(p, fused=fused, prompt_in_step=prompt_in_step)
    rt = EpisodeRuntime(vla, EpisodeCacheConfig(policy="full"), unnorm_key="bridge_orig")
    rt.reset("touch the red cube")
    f = frames(1, 1)[0]
    res = rt.step(f)
    ids = vla.prompt_ids(build_prompt("touch the red cube"))
    with torch.no_grad():
        prompt = p.language_model.get_input_embeddings()(ids)
        img = p.projector(p.vision_backbone(vla.pixel_values(f)))
        if prompt_in_step:  # modeling_prismatic: [BOS] + patches + rest of the prompt
            seq = torch.cat([prompt[:, :1], img, prompt[:, 1:]], 1)
        else:
            seq = torch.cat([prompt, img], 1)
        acts = vla.embed_tokens(torch.as_tensor(res.action_token_ids)[None])
        logits = p.language_model(inputs_embeds=torch.cat([seq, acts[:, :-1]], 1)).logits[0, -4:]
    begin = len(TOK) - 256
    torch.testing.assert_close(rt.last_action_logits, logits[:, begin : len(TOK)], atol=1e-5, rtol=1e-5)
    if prompt_in_step:  # default chunk = one step: image + prompt (without BOS) + actions
        assert rt.step_tokens == 16 + (ids.shape[1] - 1) + 4 == rt.cache_config.chunk_size
        assert rt.cache.stats().seen_tokens == 1 + rt.step_tokens
    # un-normalisation with bridge_orig's q01/q99 and mask (gripper left as the bin centre)
    expected = unnormalize_actions(
        vla.action_tokenizer.decode(res.action_token_ids), NORM_STATS, "bridge_orig"
    )
    np.testing.assert_allclose(res.action, expected, atol=1e-6)
    assert np.all(res.action[:3] <= np.array([0.1, 0.2, 0.3]) + 1e-6)


def test_reset_keeps_a_chunk_size_set_explicitly_on_the_openvla_layout(mirror):
    """On a ``prompt_in_step`` backbone a step holds the prompt too, so "one control step" (chunk_size
    0) is resolved at every reset from that instruction; a chunk size set explicitly stays as set."""
    vla = backbone(make_prismatic(mirror))
    rt = EpisodeRuntime(vla, unnorm_key="bridge_orig")  # the default config: chunk = one step
    rt.update_cache_config(policy="window", max_tokens=0, chunk_size=7)
    for instruction in ("touch the red cube", "push the blue cube to the green zone"):
        rt.reset(instruction)
        assert rt.cache.config.chunk_size == 7 and rt.cache_config.chunk_size == 7
        rt.step(frames(1, 0)[0])
    rt.update_cache_config(chunk_size=0)
    sizes = []
    for instruction in ("touch the red cube", "push the blue cube to the green zone"):
        rt.reset(instruction)
        prompt_len = vla.prompt_ids(build_prompt(instruction)).shape[1]
        assert rt.cache.config.chunk_size == rt.step_tokens == 16 + (prompt_len - 1) + 4
        sizes.append(rt.cache.config.chunk_size)
    assert sizes[0] != sizes[1] and rt.requested_config.chunk_size == 0


def test_norm_stats_need_unnorm_key_when_several(mirror):
    vla = backbone(make_prismatic(mirror))
    with pytest.raises(ValueError, match="unnorm_key"):
        EpisodeRuntime(vla)
    with pytest.raises(ValueError, match="not in norm_stats"):
        EpisodeRuntime(vla, unnorm_key="nope")


def test_not_a_prismatic_model_is_refused():
    with pytest.raises(ValueError, match="vision_backbone"):
        OpenVLABackbone(torch.nn.Linear(2, 2), TOK)


def test_load_openvla_from_a_remote_code_directory(mirror, tmp_path, monkeypatch):
    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    p = make_prismatic(mirror, seed=4)
    ckpt = tmp_path / "openvla-tiny"
    p.save_pretrained(ckpt)
    TOK.save_pretrained(ckpt)
    (ckpt / "configuration_tiny_prismatic.py").write_text(CONFIG_SRC)
    (ckpt / "modeling_tiny_prismatic.py").write_text(MODELING_SRC)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["auto_map"] = {
        "AutoConfig": "configuration_tiny_prismatic.TinyPrismaticConfig",
        "AutoModelForVision2Seq": "modeling_tiny_prismatic.TinyPrismaticForActionPrediction",
    }
    (ckpt / "config.json").write_text(json.dumps(cfg))
    (ckpt / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "PrismaticImageProcessor",
                "use_fused_vision_backbone": True,
                "input_sizes": [[3, 32, 32], [3, 32, 32]],
                "means": [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]],
                "stds": [[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]],
            }
        )
    )
    with pytest.raises(ValueError, match=r"^trust_remote_code: .* runs Python files from that folder"):
        load_openvla(ckpt, prompt_suffix_id=SUFFIX)  # off by default: nothing from the folder runs
    with pytest.raises(ValueError, match=r"^trust_remote_code:"):
        EpisodeRuntime.from_pretrained(ckpt)
    assert not (tmp_path / "hf_modules").exists()  # refused before any of its code was imported
    loaded = load_openvla(ckpt, prompt_suffix_id=SUFFIX, trust_remote_code=True)
    assert loaded.image_size == 32 and len(loaded.means) == 2
    assert loaded.norm_stats == NORM_STATS
    ref = backbone(p)
    cc = EpisodeCacheConfig(policy="window", chunk_size=16 + 4 + 5, recent_chunks=1, max_tokens=None)
    out = []
    for vla in (ref, loaded):
        rt = EpisodeRuntime(vla, cc, unnorm_key="kv_vla_sim")
        rt.reset("push the blue cube")
        logits = []
        for f in frames(3, 5):
            rt.step(f)
            logits.append(rt.last_action_logits.clone())
        out.append(torch.stack(logits))
    assert_logits_close(out[1], out[0])  # a model loaded from disk may round differently (MKL alignment)


def test_load_openvla_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_openvla(tmp_path)
