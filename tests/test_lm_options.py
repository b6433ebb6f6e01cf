"""nanoGPT's settings for the transformer: tied weights, GPT-2 init, random LM windows."""

from __future__ import annotations

import math

import pytest
import torch

from dgtrain import checkpoint as ckpt_io
from dgtrain.data import make_loader
from dgtrain.data.sequences import text
from dgtrain.errors import DgtrainError
from dgtrain.finetune import load_init_weights
from dgtrain.models.transformer import Transformer


def test_tie_weights_shares_the_embedding_and_survives_safetensors(tmp_path):
    untied = Transformer(50, arch="decoder", d_model=32, n_layers=2)
    tied = Transformer(50, arch="decoder", d_model=32, n_layers=2, tie_weights=True)
    assert tied.head.weight is tied.tok_emb.weight
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(untied) - n(tied) == 50 * 32
    ckpt_io.save_weights(tied, tmp_path / "model.safetensors")  # stores the shared matrix once
    fresh = Transformer(50, arch="decoder", d_model=32, n_layers=2, tie_weights=True)
    report = load_init_weights(fresh, tmp_path / "model.safetensors")  # strict: the alias is not "missing"
    assert report["missing"] == [] and torch.equal(fresh.head.weight, tied.tok_emb.weight)


def test_gpt2_init_scales_residual_projections_by_depth():
    torch.manual_seed(0)
    m = Transformer(100, arch="decoder", d_model=128, n_layers=8, init="gpt2")
    block = m.decoder[3]
    assert block.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * 8)
    assert block.self_attn.out_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert block.ff[2].weight.std().item() == pytest.approx(residual, rel=0.05)
    assert block.ff[0].bias.abs().max().item() == 0.0
    with pytest.raises(DgtrainError, match="model.init='xavier'"):
        Transformer(10, init="xavier")


def test_random_windows_fill_every_batch_and_resume_exactly():
    corpus = text(seed=0, max_chars=5000, seq_len=16)
    seq = text(seed=0, max_chars=5000, seq_len=16, sampling="sequential")
    n_windows = len(seq.train)
    last_seq = list(make_loader(seq.train, 32, shuffle=True, seed=0))[-1]
    assert len(last_seq[0]) == n_windows % 32  # the fixed windows end the epoch with a short batch
    loader = make_loader(corpus.train, 32, shuffle=True, seed=0)
    assert len(loader) == n_windows // 32
    epoch0 = list(loader)
    assert all(x.shape == (32, 16) and torch.equal(x[:, 1:], y[:, :-1]) for x, y in epoch0)
    starts = {int(x[0, 0]) for x, _ in epoch0}
    assert len(starts) > 1
    loader.batch_sampler.set_epoch(0, 3)  # resume at batch 3 of epoch 0: the same windows
    assert all(torch.equal(a[0], b[0]) for a, b in zip(list(loader), epoch0[3:], strict=True))
    loader.batch_sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))[0], epoch0[0][0])  # a new draw each epoch
    val = list(make_loader(corpus.val, 32, shuffle=False, seed=0))  # validation: the fixed windows
    assert sum(len(x) for x, _ in val) == len(corpus.val)
    with pytest.raises(DgtrainError, match="data.sampling='shuffled'"):
        text(seed=0, max_chars=5000, sampling="shuffled")


def test_gpt2_head_has_no_bias_when_asked(compose):
    """model.head_bias=false: GPT-2's output head (no bias), tied or not; built from the config too."""
    from dgtrain.train import setup

    with_bias = Transformer(50, arch="decoder", d_model=32, n_layers=1, vocab_multiple=64)
    plain = Transformer(50, arch="decoder", d_model=32, n_layers=1, vocab_multiple=64, head_bias=False)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert plain.head.bias is None and n(with_bias) - n(plain) == 64  # the padded vocabulary's biases
    tied = Transformer(50, arch="decoder", d_model=32, n_layers=1, tie_weights=True, head_bias=False)
    assert "head.bias" not in tied.state_dict() and tied(torch.randint(0, 50, (2, 5))).shape == (2, 5, 50)
    s = setup(compose(["model=transformer", "model.head_bias=false", "device=cpu"]))
    assert s.model.head.bias is None
