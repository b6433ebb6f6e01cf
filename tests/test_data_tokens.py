"""data=tokens: nanoGPT raw and llm.c token files through np.memmap; random seeded windows; clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dgtrain.data import make_loader
from dgtrain.data.tokens import tokens
from dgtrain.errors import DgtrainError
from tests.conftest import FAST, read_metrics, run_cli


def write_raw(path, ids, dtype=np.uint16):
    np.asarray(ids, dtype=dtype).tofile(path)
    return path


def write_llmc(path, ids, magic=20240520, dtype=np.uint16):
    header = np.zeros(256, dtype=np.int32)
    header[:3] = magic, 1 if magic == 20240520 else 7, len(ids)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(ids, dtype=dtype).tobytes())
    return path


def test_raw_files_with_meta_json_give_random_seeded_windows_of_the_file(tmp_path):
    ids = np.arange(5000) % 97
    write_raw(tmp_path / "train.bin", ids)
    write_raw(tmp_path / "val.bin", ids[:700])
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 97}))
    b = tokens(seed=3, train_path=str(tmp_path / "train.bin"), val_path=str(tmp_path / "val.bin"), seq_len=64)
    assert b.info.task == "lm" and b.info.vocab_size == 97 and b.info.max_len == 64
    assert isinstance(b.train.file.tokens, np.memmap)
    x, y = b.train.__getitems__(list(range(len(b.train))))
    assert x.dtype == torch.long and x.shape == (len(b.train), 64)
    starts = b.train.starts(range(len(b.train)))
    for s, xi, yi in zip(starts, x, y, strict=True):  # each window is the file's tokens at its offset
        assert torch.equal(xi, torch.from_numpy(ids[s : s + 64]).long())
        assert torch.equal(yi, torch.from_numpy(ids[s + 1 : s + 65]).long())
    assert starts.max() + 65 <= 5000 and len(set((starts % 64).tolist())) > 10  # not the aligned split
    again = tokens(seed=3, train_path=str(tmp_path / "train.bin"), seq_len=64, vocab_size=97)
    other = tokens(seed=4, train_path=str(tmp_path / "train.bin"), seq_len=64, vocab_size=97)
    n = len(again.train)
    assert np.array_equal(again.train.starts(range(n)), b.train.starts(range(n)))
    assert not np.array_equal(other.train.starts(range(n)), b.train.starts(range(n)))
    assert np.array_equal(b.val.starts(range(len(b.val))), np.arange(len(b.val)) * 64)  # aligned
    # the seeded sampler resumes mid-epoch to the same batches
    loader = make_loader(b.train, 8, shuffle=True, seed=0)
    loader.batch_sampler.set_epoch(1)
    full = [xb for xb, _ in loader]
    loader.batch_sampler.set_epoch(1, 3)
    assert all(torch.equal(a, c) for a, c in zip(full[3:], [xb for xb, _ in loader], strict=True))


def test_llmc_shards_read_the_header_dtype_and_vocabulary(tmp_path):
    ids = (np.arange(3000) * 7919) % 50257
    b = tokens(seed=0, train_path=str(write_llmc(tmp_path / "gpt2.bin", ids)), seq_len=32)
    assert b.info.vocab_size == 50257 and b.train.file.dtype == np.uint16
    assert torch.equal(b.val[0][0], torch.from_numpy(ids[b.val.start : b.val.start + 32]).long())
    big = (np.arange(3000) * 104729) % 128256
    b = tokens(seed=0, train_path=str(write_llmc(tmp_path / "l3.bin", big, 20240801, np.uint32)), seq_len=32)
    assert b.info.vocab_size == 128256 and int(b.train.file.tokens.max()) > 65535
    raw32 = write_raw(tmp_path / "raw32.bin", big, np.uint32)
    b = tokens(seed=0, train_path=str(raw32), dtype="uint32", vocab_size=128256, seq_len=32)
    assert torch.equal(b.val[0][0], torch.from_numpy(big[b.val.start : b.val.start + 32]).long())


def test_bad_token_files_name_the_file_and_the_fix(tmp_path):
    good = write_raw(tmp_path / "good.bin", np.arange(2000) % 50)

    def fails(match, **kw):
        kw = {"seed": 0, "train_path": str(good), "vocab_size": 50, "seq_len": 16, **kw}
        with pytest.raises(DgtrainError, match=match):
            tokens(**kw)

    fails(r"train_path=.*nope.bin: file not found", train_path=str(tmp_path / "nope.bin"))
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    fails(r"odd.bin: 3 bytes is not a whole number of uint16", train_path=str(tmp_path / "odd.bin"))
    short = write_llmc(tmp_path / "short.bin", np.arange(600))
    short.write_bytes(short.read_bytes()[:-10])
    fails(r"short.bin: the llm.c header announces 600 uint16 tokens", train_path=str(short), vocab_size=None)
    fails(r"good.bin: token 40 at position 40 is outside the vocabulary \(vocab_size=40\)", vocab_size=40)
    fails(r"vocab_size=70000 does not fit in uint16", vocab_size=70000)
    fails(r"too few for data.seq_len=4000", seq_len=4000)
    fails(r"val.bin: file not found", val_path=str(tmp_path / "val.bin"))
    (tmp_path / "meta.pkl").write_bytes(b"\x80\x04not loaded")
    fails(
        r"vocabulary size .* is unknown.*meta.pkl is a pickle, which dgtrain does not load", vocab_size=None
    )
    (tmp_path / "meta.json").write_text('{"vocab": 5}')
    fails(r"meta.json: needs a positive integer `vocab_size`", vocab_size=None)


def test_bad_token_file_exits_2_naming_it(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    p = run_cli(
        ["model=transformer", "data=tokens", f"data.train_path={tmp_path / 'odd.bin'}", "data.vocab_size=5"],
        cwd=tmp_path,
    )
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert "odd.bin" in out and "not a whole number of uint16 tokens" in out


@pytest.mark.slow
def test_decoder_lm_trains_on_token_files_with_a_padded_vocabulary(tmp_path):
    rng = np.random.default_rng(0)
    # a learnable stream: a random walk over 60 ids
    ids = np.cumsum(rng.choice([1, 2], size=20000)) % 60
    write_raw(tmp_path / "train.bin", ids)
    write_raw(tmp_path / "val.bin", ids[:2000])
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 60, "dtype": "uint16"}))
    run_dir = tmp_path / "run"
    p = run_cli(
        [
            "model=transformer",
            "data=tokens",
            f"data.train_path={tmp_path / 'train.bin'}",
            f"data.val_path={tmp_path / 'val.bin'}",
            "data.seq_len=32",
            "data.batch_size=16",
            "model.d_model=32",
            "model.n_layers=1",
            "model.vocab_multiple=64",
            "model.activation_checkpointing=true",
            "optimizer.lr=3e-3",
            "trainer.max_steps=40",
            "trainer.eval_batches=4",
            *FAST,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    rows = [r for r in read_metrics(run_dir) if "train/loss" in r]
    assert rows[-1]["train/loss"] < 0.7 * rows[0]["train/loss"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final"]["val/ppl"] < 15
