"""Each model: output shapes, a gradient for every parameter, and it can overfit one small batch."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from dgtrain.data import DataInfo
from dgtrain.errors import DgtrainError
from dgtrain.models.convnet import ConvNet
from dgtrain.models.linreg import LinearRegression
from dgtrain.models.mlp import MLP
from dgtrain.models.transformer import Transformer


def _seq2seq_batch():
    # Reversal pairs of several lengths in one batch: padding and masks are exercised.
    from dgtrain.data.sequences import seq2seq_synthetic

    data = seq2seq_synthetic(seed=0, num_examples=40, min_len=3, max_len=8)
    src, tgt = data.train.__getitems__(list(range(8)))
    assert (src == 0).any(), "the batch should contain padding"
    return src, tgt


CASES = {
    "linreg": (
        lambda: LinearRegression.from_data(DataInfo(task="regression", in_shape=(5,), out_dim=2)),
        # targets linear in the inputs, so one linear layer can fit them exactly
        lambda g: (x := torch.randn(16, 5, generator=g), x @ torch.randn(5, 2, generator=g) + 0.5),
        (16, 2),
    ),
    "mlp": (
        lambda: MLP.from_data(
            DataInfo(task="classification", in_shape=(1, 8, 8), num_classes=10), hidden_size=32
        ),
        lambda g: (torch.randn(16, 1, 8, 8, generator=g), torch.randint(10, (16,), generator=g)),
        (16, 10),
    ),
    "convnet": (
        lambda: ConvNet.from_data(DataInfo(task="classification", in_shape=(3, 12, 10), num_classes=4)),
        lambda g: (torch.randn(16, 3, 12, 10, generator=g), torch.randint(4, (16,), generator=g)),
        (16, 4),
    ),
    "transformer_lm": (
        lambda: Transformer.from_data(
            DataInfo(task="lm", vocab_size=20, max_len=16), d_model=32, dropout=0.0
        ),
        lambda g: (torch.randint(20, (8, 16), generator=g), torch.randint(20, (8, 16), generator=g)),
        (8, 16, 20),
    ),
}


def _loss(name, model, batch):
    x, y = batch
    if name == "linreg":
        return F.mse_loss(model(x), y)
    if name == "transformer_lm":
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("name", list(CASES))
def test_shapes_gradients_and_overfit(name):
    torch.manual_seed(0)
    make, batch_fn, shape = CASES[name]
    model = make()
    batch = batch_fn(torch.Generator().manual_seed(1))
    assert tuple(model(batch[0]).shape) == shape

    loss = _loss(name, model, batch)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {pname}"

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = loss.item()
    for _ in range(200):
        opt.zero_grad()
        loss = _loss(name, model, batch)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first, f"{name} did not overfit one batch: {first:.4f} -> {loss.item():.4f}"


def test_seq2seq_transformer_shapes_gradients_overfit_and_greedy_decode():
    torch.manual_seed(0)
    info = DataInfo(task="seq2seq", vocab_size=13, pad_id=0, bos_id=1, eos_id=2, max_len=8)
    model = Transformer.from_data(info, d_model=32, n_heads=4, n_layers=2, dropout=0.0)
    assert model.arch == "encdec"
    src, tgt = _seq2seq_batch()
    logits = model(src, tgt[:, :-1])
    assert logits.shape == (8, tgt.shape[1] - 1, 13)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=0)
    loss_fn(logits.flatten(0, 1), tgt[:, 1:].flatten()).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {pname}"
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        loss = loss_fn(model(src, tgt[:, :-1]).flatten(0, 1), tgt[:, 1:].flatten())
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    model.eval()
    out = model.generate(src, max_len=tgt.shape[1] - 1)
    target = tgt[:, 1:]
    real = target != 0
    assert (out[:, : target.shape[1]][real] == target[real]).float().mean() > 0.95


def test_padding_does_not_change_encdec_outputs():
    """Extra padding on a batch must not change what the real tokens produce (masks work)."""
    torch.manual_seed(0)
    info = DataInfo(task="seq2seq", vocab_size=13, pad_id=0, bos_id=1, eos_id=2, max_len=12)
    model = Transformer.from_data(info, d_model=32, dropout=0.0).eval()
    src = torch.tensor([[5, 6, 7, 2]])
    tgt_in = torch.tensor([[1, 7, 6]])
    padded_src = torch.tensor([[5, 6, 7, 2, 0, 0, 0]])
    a = model(src, tgt_in)
    b = model(padded_src, tgt_in)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_model_config_errors_are_clear():
    with pytest.raises(DgtrainError, match="model.arch=encdec cannot learn lm"):
        Transformer.from_data(DataInfo(task="lm", vocab_size=5, max_len=8), arch="encdec")
    with pytest.raises(DgtrainError, match="max_positions"):
        Transformer.from_data(DataInfo(task="lm", vocab_size=5, max_len=600))
    with pytest.raises(DgtrainError, match="divisible"):
        Transformer.from_data(DataInfo(task="lm", vocab_size=5, max_len=8), d_model=30, n_heads=4)
    with pytest.raises(DgtrainError, match="two widths"):
        ConvNet.from_data(
            DataInfo(task="classification", in_shape=(1, 8, 8), num_classes=3), channels=[4, 8, 16]
        )


def test_convnet_channels_last_is_chosen_per_device_and_computes_the_same_function():
    info = DataInfo(task="classification", in_shape=(3, 8, 8), num_classes=10)
    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(0)
    plain = ConvNet.from_data(info)
    plain.for_device(torch.device("cpu"))  # auto: NCHW on CPU, so CPU runs stay bit-identical
    assert not plain.channels_last and plain.conv2.weight.is_contiguous()
    for mode, device, expect in [
        ("auto", "cuda", True),
        ("true", "cpu", True),
        ("false", "cuda", False),
        (False, "cuda", False),
    ]:
        torch.manual_seed(0)
        m = ConvNet.from_data(info, channels_last=mode)
        m.for_device(torch.device(device))  # only the choice and the layout; the tensors stay on the CPU
        assert m.channels_last is expect, (mode, device)
        assert m.conv2.weight.is_contiguous(memory_format=torch.channels_last) is expect
        torch.testing.assert_close(m(x), plain(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["encdec", "decoder"])
def test_activation_checkpointing_keeps_loss_and_gradients_bitwise_and_saves_less(arch):
    """model.activation_checkpointing: the same loss and gradients to the bit on CPU fp32, dropout
    included (the checkpoint replays the RNG), while the graph keeps fewer bytes for backward."""
    from dgtrain.telemetry import graph_stats

    if arch == "encdec":
        info = DataInfo(task="seq2seq", vocab_size=13, pad_id=0, bos_id=1, eos_id=2, max_len=16)
        batch = _seq2seq_batch()
    else:
        info = DataInfo(task="lm", vocab_size=11, max_len=16)
        x = torch.randint(11, (4, 17), generator=torch.Generator().manual_seed(3))
        batch = (x[:, :-1], x[:, 1:])

    def forward(model, batch):
        if arch == "encdec":
            src, tgt = batch
            logits = model(src, tgt[:, :-1])
            return F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=0)
        return F.cross_entropy(model(batch[0]).flatten(0, 1), batch[1].flatten())

    results = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = Transformer.from_data(
            info, d_model=32, n_heads=4, n_layers=3, dropout=0.2, activation_checkpointing=ckpt
        )
        torch.manual_seed(1)  # the same dropout masks for both
        loss = forward(model, batch)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        saved = graph_stats(model, functools.partial(forward, model), batch)["saved_bytes"]
        results[ckpt] = loss.detach(), grads, saved
    (loss0, grads0, saved0), (loss1, grads1, saved1) = results[False], results[True]
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1, strict=True))
    assert saved1 < 0.6 * saved0, (saved0, saved1)


def test_vocab_multiple_pads_embedding_and_head_and_decoding_never_emits_padding_ids():
    info = DataInfo(task="seq2seq", vocab_size=13, pad_id=0, bos_id=1, eos_id=2, max_len=8)
    model = Transformer.from_data(info, d_model=32, dropout=0.0, vocab_multiple=8).eval()
    assert model.tok_emb.num_embeddings == 16 and model.head.out_features == 16
    with torch.no_grad():
        model.head.bias[13:] = 1e4  # the padding ids would win every argmax if decoding looked at them
    src, _ = _seq2seq_batch()
    assert int(model.generate(src, max_len=5).max()) < 13
    lm = Transformer.from_data(
        DataInfo(task="lm", vocab_size=50257, max_len=8), d_model=8, n_heads=2, n_layers=1, vocab_multiple=64
    )
    assert lm.head.out_features == 50304
    with pytest.raises(DgtrainError, match="vocab_multiple"):
        Transformer.from_data(info, vocab_multiple=0)
