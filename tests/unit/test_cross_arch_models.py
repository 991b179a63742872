"""The causal MLP-Mixer LM and the ViT (issue 12): shapes, causality, digits, parameter counts, and the
``model.arch`` config field's refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lrscale_megatron.configs.base import ConfigError
from lrscale_megatron.data.datasets import get_batch
from lrscale_megatron.data.digits import NUM_CLASSES, accuracy, digits_splits
from lrscale_megatron.models.arch import arch_num_params, build_arch_model
from lrscale_megatron.models.gpt import gpt_loss_fn
from lrscale_megatron.models.mixer import CausalMixer, MixerConfig, mixer_num_params
from lrscale_megatron.models.vit import ViT, ViTConfig, vit_num_params
from lrscale_megatron.train.config import config_from_dict

ROOT = Path(__file__).resolve().parents[2]


def _raw(name: str) -> dict:
    raw = json.loads((ROOT / "configs" / "gpt" / name).read_text())
    raw["deepspeed"] = json.loads((ROOT / "configs" / "deepspeed" / "cpu-adamw-lrscale.json").read_text())
    return raw


def _mixer(seed: int = 0) -> CausalMixer:
    m = CausalMixer(MixerConfig(vocab_size=32, seq_length=12, hidden_size=16, num_layers=2))
    m.init_weights(seed)
    return m


def test_mixer_shapes_and_loss():
    m = _mixer()
    tokens = torch.randint(0, 32, (3, 12), generator=torch.Generator().manual_seed(0))
    logits = m(tokens)
    assert logits.shape == (3, 12, 32)
    labels = torch.roll(tokens, -1, 1)
    per_token = m(tokens, labels=labels)
    assert per_token.shape == (3, 12)
    assert torch.allclose(per_token.mean(), F.cross_entropy(logits.reshape(-1, 32), labels.reshape(-1)))
    shorter = m(tokens[:, :5])  # shorter sequences use the top-left corner of the mixing matrix
    assert torch.allclose(shorter, logits[:, :5], atol=1e-6)
    with pytest.raises(ValueError, match="seq_length"):
        m(torch.zeros(1, 13, dtype=torch.long))


def test_mixer_is_causal_future_tokens_do_not_change_earlier_logits():
    m = _mixer(seed=1)
    with torch.no_grad():  # make the token mixing strong so a leak could not hide in round-off
        for blk in m.blocks:
            blk.token_mix.normal_(0.0, 1.0)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 32, (2, 12), generator=g)
    for k in (0, 5, 10):
        b = a.clone()
        b[:, k + 1 :] = torch.randint(0, 32, b[:, k + 1 :].shape, generator=g)
        assert not torch.equal(a[:, k + 1 :], b[:, k + 1 :])
        la, lb = m(a), m(b)
        assert torch.equal(la[:, : k + 1], lb[:, : k + 1]), k
        assert (la[:, k + 1 :] - lb[:, k + 1 :]).abs().max() > 1e-3, k  # later positions do see them


def test_mixer_without_the_mask_would_leak():
    """The causality test can fail: unmask the matrix and earlier logits move."""
    m = _mixer(seed=1)
    with torch.no_grad():
        for blk in m.blocks:
            blk.token_mix.normal_(0.0, 1.0)
            blk.causal.fill_(True)
    a = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(0))
    b = a.clone()
    b[:, -1] = (b[:, -1] + 1) % 32
    assert (m(a)[:, 0] - m(b)[:, 0]).abs().max() > 1e-4


def test_param_counts_match_the_modules():
    for cfg in (MixerConfig(), MixerConfig(hidden_size=40, num_layers=3, tie_embeddings=False)):
        total, non_emb = mixer_num_params(cfg)
        m = CausalMixer(cfg)
        assert total == sum(p.numel() for p in m.parameters())
        assert total - non_emb == cfg.vocab_size * cfg.hidden_size
    for cfg in (ViTConfig(), ViTConfig(hidden_size=48, num_layers=3, num_heads=6)):
        total, non_emb = vit_num_params(cfg)
        v = ViT(cfg)
        assert total == sum(p.numel() for p in v.parameters())
        emb = sum(p.numel() for n, p in v.named_parameters() if "embed" in n)
        assert total - non_emb == emb


def test_config_counts_dispatch_on_arch():
    for name in ("cpu-mixer-target.json", "cpu-vit-target.json"):
        cfg = config_from_dict(_raw(name))
        model = build_arch_model(cfg)
        assert cfg.model.num_params() == sum(p.numel() for p in model.parameters())
        assert cfg.model.num_non_embedding_params() == arch_num_params(cfg.model)[1]
    gpt = config_from_dict(_raw("cpu-target.json"))
    assert gpt.model.arch == "gpt" and gpt.model.num_non_embedding_params() == 396_800  # unchanged


def test_digits_splits_and_vit_forward():
    s = digits_splits()
    assert len(s.train) + len(s.valid) == 1797 and len(s.valid) == 359
    assert set(s.train.classes().tolist()) == set(range(NUM_CLASSES))
    assert int(s.train.tokens.min()) == 0 and int(s.train.tokens.max()) == 16
    batch = get_batch(s.train, 0, 8)
    b = {k: getattr(batch, k) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    vit = ViT(ViTConfig(hidden_size=32, num_layers=2, num_heads=4))
    vit.init_weights(0)
    with torch.no_grad():
        vit.head.weight.normal_(0, 0.5)
    assert vit.patches(b["tokens"]).shape == (8, 16, 16)
    logits = vit(b["tokens"])
    assert logits.shape == (8, NUM_CLASSES)
    want = F.cross_entropy(logits, b["labels"][:, 0])
    assert torch.allclose(gpt_loss_fn(vit, b), want, atol=1e-6)
    assert 0.0 <= accuracy(vit, s.valid) <= 1.0
    # the patches are the (upsampled) image: a bright pixel lands in the patch that covers it
    img = torch.zeros(1, 64, dtype=torch.long)
    img[0, 0] = 16  # top-left pixel
    p = vit.patches(img)
    assert p[0, 0].max() > 0.5 and p[0, 1:].abs().max() < 0.1


def _err(raw: dict) -> str:
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    return str(e.value)


def test_arch_config_refusals_name_field_value_and_fix():
    raw = _raw("cpu-mixer-target.json")
    bad = copy.deepcopy(raw)
    bad["model"]["arch"] = "mixr"
    msg = _err(bad)
    assert "arch" in msg and "'mixr'" in msg and "did you mean 'mixer'" in msg
    bad = copy.deepcopy(raw)
    bad["parallel"]["tp"] = 2
    assert "tp=1" in _err(bad)
    bad = copy.deepcopy(raw)
    bad["data"] = {"corpus": "digits", "shift": None}
    msg = _err(bad)
    assert "data.corpus" in msg and "vit" in msg
    vit = _raw("cpu-vit-target.json")
    for path, value, field in (
        (("data", "corpus"), "shakespeare", "data.corpus"),
        (("model", "seq_length"), 63, "model.seq_length"),
        (("model", "vocab_size"), 264, "model.vocab_size"),
    ):
        bad = copy.deepcopy(vit)
        bad[path[0]][path[1]] = value
        msg = _err(bad)
        assert msg.startswith(field) and "Fix:" in msg, msg
    assert config_from_dict(vit).model.arch == "vit"
    assert config_from_dict(vit).lambada_passages == 0  # auto: no last-word metric for images
    bad = copy.deepcopy(vit)
    bad["data"]["lambada_passages"] = 8
    msg = _err(bad)
    assert msg.startswith("data.lambada_passages") and "vit" in msg, msg
    assert config_from_dict(raw).lambada_passages == 64  # the mixer is a language model: scored


@pytest.mark.parametrize("arch", ["mixer", "vit"])
def test_tune_ladder_counts_each_architectures_own_params(tmp_path, arch):
    """``lrscale tune`` feeds the law the architecture's own non-embedding count, proxies and target."""
    from lrscale_megatron.tune.config import load_tune_config
    from lrscale_megatron.tune.ladder import derive_ladder, load_target
    from lrscale_megatron.tune.report import true_params
    from lrscale_megatron.tune.run import write_ladder

    cfg = load_tune_config(ROOT / "configs" / "tune" / f"{arch}-cpu.json")
    target = load_target(cfg)
    tc = config_from_dict(_raw(f"cpu-{arch}-target.json"))
    assert target.params == arch_num_params(tc.model)[1]
    ladder = write_ladder(derive_ladder(cfg, target).sweep, tmp_path)
    counts = true_params(tmp_path / "sweep.sqlite", ladder)
    assert sorted(w for w, _ in counts) == [16, 24, 32, 40]
    for (w, d), n in counts.items():
        if arch == "mixer":
            want = mixer_num_params(MixerConfig(vocab_size=264, seq_length=64, hidden_size=w, num_layers=d))[
                1
            ]
        else:
            want = vit_num_params(ViTConfig(hidden_size=w, num_layers=d, num_heads=w // 8))[1]
        assert n == want, (w, n, want)
