"""Last-word accuracy: oracles with known answers (all right, one token wrong, uniform logits) and a
real megatron GPT whose word NLL must equal megatron's own per-token loss at the target positions."""

from __future__ import annotations

import math

import pytest
import torch

from lrscale_megatron.data.lambada import EncodedPassage
from lrscale_megatron.train.downstream import last_word_accuracy

V = 50
PASSAGES = [
    EncodedPassage(context=(1, 2, 3, 4), target=(7, 8)),
    EncodedPassage(context=(5, 6), target=(9,)),
    EncodedPassage(context=(3, 3, 3, 3, 3, 3), target=(10, 11, 12)),
]


class Oracle(torch.nn.Module):
    """Logits one-hot on the true next token of the passage the row holds (``wrong``: one (passage,
    target index) it gets wrong on purpose)."""

    def __init__(self, passages, wrong=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.full = [list(p.context) + list(p.target) for p in passages]
        self.ctx = [len(p.context) for p in passages]
        self.wrong = wrong

    def forward(self, tokens, pos, mask):
        assert not self.training  # scored in eval mode
        b, s = tokens.shape
        out = torch.zeros(b, s, V)
        for i in range(b):
            k = next(j for j, f in enumerate(self.full) if tokens[i, : len(f) - 1].tolist() == f[:-1])
            for t in range(len(self.full[k]) - 1):
                nxt = self.full[k][t + 1]
                if self.wrong == (k, t + 1 - self.ctx[k]):
                    nxt = (nxt + 1) % V
                out[i, t, nxt] = 30.0
        return out


def test_oracle_is_always_right_and_training_mode_is_restored():
    m = Oracle(PASSAGES).train()
    r = last_word_accuracy(m, PASSAGES, batch_size=2)
    assert r["accuracy"] == 1.0 and r["n"] == 3 and r["word_nll"] < 1e-6
    assert m.training


def test_one_wrong_token_loses_the_whole_word():
    r = last_word_accuracy(Oracle(PASSAGES, wrong=(2, 2)), PASSAGES)  # last token of the 3-token word
    assert r["accuracy"] == pytest.approx(2 / 3)


class Uniform(Oracle):
    def forward(self, tokens, pos, mask):
        return torch.zeros(*tokens.shape, V)


def test_uniform_logits_give_the_entropy_per_word():
    r = last_word_accuracy(Uniform(PASSAGES), PASSAGES)
    assert r["accuracy"] == 0.0  # argmax of a tie is id 0, never a target here
    assert r["word_nll"] == pytest.approx(math.log(V) * (2 + 1 + 3) / 3)


def test_megatron_gpt_word_nll_equals_its_own_loss_at_the_target_positions():
    from lrscale_megatron.integrations.megatron_cpu import CudaToCpuMode
    from lrscale_megatron.launch import init_megatron, shutdown
    from lrscale_megatron.models.gpt import build_gpt, causal_mask, get_preset

    ctx = init_megatron(1, 1, seed=0)
    try:
        preset = get_preset("tiny")
        model = build_gpt(preset, ctx, dtype=torch.float32, seed=0)
        g = torch.Generator().manual_seed(0)
        ps = [
            EncodedPassage(
                context=tuple(torch.randint(0, 256, (n,), generator=g).tolist()),
                target=tuple(torch.randint(0, 256, (k,), generator=g).tolist()),
            )
            for n, k in ((10, 3), (20, 1), (5, 4))
        ]
        with CudaToCpuMode():
            r = last_word_accuracy(model, ps, batch_size=2)
            model.eval()
            ref_nll, ref_right = 0.0, 0
            with torch.no_grad():
                for p in ps:  # one unpadded sequence at a time, through megatron's labels path
                    seq = torch.tensor([list(p.context) + list(p.target)])
                    tokens, labels = seq[:, :-1], seq[:, 1:]
                    s = tokens.shape[1]
                    per_token = model(tokens, torch.arange(s).unsqueeze(0), causal_mask(s), labels=labels)
                    at = slice(len(p.context) - 1, s)
                    ref_nll += float(per_token[0, at].sum())
                    logits = model(tokens, torch.arange(s).unsqueeze(0), causal_mask(s))
                    ref_right += int(bool((logits[0, at].argmax(-1) == labels[0, at]).all()))
        assert r["word_nll"] == pytest.approx(ref_nll / len(ps), rel=1e-5)
        assert r["accuracy"] == ref_right / len(ps)
    finally:
        shutdown()
