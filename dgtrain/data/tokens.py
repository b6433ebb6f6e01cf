"""`tokens`: pre-tokenized token files, as nanoGPT's `prepare.py` and llm.c's `dev/data/*.py` write them.

Two layouts are read, both through `np.memmap`, so a file larger than RAM costs only the pages a batch
touches:

- raw (nanoGPT `train.bin` / `val.bin`): the token ids back to back, uint16 (or uint32 for vocabularies
  above 65,536), with no header;
- llm.c: a header of 256 int32 (magic 20240520 = GPT-2 with uint16 tokens, or 20240801 = Llama 3 with
  uint32 tokens; version; token count) followed by the tokens.

The vocabulary size comes from `data.vocab_size`, else from a JSON file beside the train file
(`meta.json`: `{"vocab_size": 50257}`, optionally `"dtype": "uint16"`), else from the llm.c header's
model (GPT-2: 50,257; Llama 3: 128,256). nanoGPT's `meta.pkl` is a pickle, which dgtrain never loads
(a pickle can run code); the error says how to write the JSON file from it.

Training examples are windows of `seq_len + 1` tokens at random offsets: window i starts at
`i * seq_len + jitter(seed, i)`, the jitter a hash in [0, seq_len), so the windows cover the file evenly,
differ from the aligned split, and depend on the seed alone; the epoch-seeded sampler shuffles them,
so the order is reproducible and a resume continues exactly. Validation windows are aligned.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dgtrain.data import DataBundle, DataInfo
from dgtrain.errors import DgtrainError

LLMC_HEADER_INTS = 256
# llm.c's magic numbers: the model whose tokenizer wrote the file, its token width and vocabulary.
LLMC_MAGIC = {
    20240520: ("gpt-2", np.uint16, 50257),
    20240801: ("llama-3", np.uint32, 128256),
}
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
# Tokens checked against the vocabulary when a file is opened (the whole file would mean reading all
# of it); every batch is checked too, on the host, as it is cut from the file.
CHECK_HEAD = 1 << 20


class TokenFile:
    """One token file mapped into memory: `tokens` is a read-only np.memmap of its ids."""

    def __init__(self, path: Path, key: str, dtype: str | None):
        self.path, self.key = path, key
        if not path.is_file():
            raise DgtrainError(
                f"{key}={path}: file not found. Expected a pre-tokenized file (nanoGPT's train.bin/val.bin "
                "or an llm.c .bin shard)."
            )
        size = path.stat().st_size
        offset, self.model = 0, None
        if size >= 4 * LLMC_HEADER_INTS:
            header = np.fromfile(path, dtype="<i4", count=LLMC_HEADER_INTS)
            if int(header[0]) in LLMC_MAGIC:
                self.model, np_dtype, _ = LLMC_MAGIC[int(header[0])]
                offset, count = 4 * LLMC_HEADER_INTS, int(header[2])
                expected = offset + count * np.dtype(np_dtype).itemsize
                if size != expected:
                    raise DgtrainError(
                        f"{key}={path}: the llm.c header announces {count:,} {np.dtype(np_dtype).name} tokens "
                        f"({expected:,} bytes with the header) but the file has {size:,} bytes; it is "
                        "truncated or not an llm.c shard. Write it again."
                    )
                if dtype is not None and np.dtype(DTYPES[dtype]) != np.dtype(np_dtype):
                    raise DgtrainError(
                        f"data.dtype={dtype}: {path} is an llm.c {self.model} shard of "
                        f"{np.dtype(np_dtype).name} tokens; leave data.dtype unset (null)."
                    )
        if offset == 0:
            np_dtype = DTYPES[dtype or "uint16"]
            itemsize = np.dtype(np_dtype).itemsize
            if size % itemsize:
                raise DgtrainError(
                    f"{key}={path}: {size:,} bytes is not a whole number of {np.dtype(np_dtype).name} "
                    f"tokens. Check data.dtype (uint16 or uint32) against how the file was written."
                )
        n = (size - offset) // np.dtype(np_dtype).itemsize
        self.dtype = np.dtype(np_dtype)
        self.tokens = (
            np.memmap(path, dtype=np_dtype, mode="r", offset=offset, shape=(n,)) if n else np.zeros(0)
        )

    def __len__(self) -> int:
        return len(self.tokens)

    def check_vocab(self, ids: np.ndarray, vocab_size: int, where: int = 0) -> None:
        if len(ids) and int(ids.max()) >= vocab_size:
            bad = int(np.argmax(ids >= vocab_size))
            raise DgtrainError(
                f"{self.key}={self.path}: token {int(ids[bad])} at position {where + bad:,} is outside the "
                f"vocabulary (vocab_size={vocab_size}). Set data.vocab_size (or meta.json) to the tokenizer's "
                "vocabulary, or check data.dtype."
            )


def _jitter(seed: int, idx: np.ndarray, seq_len: int) -> np.ndarray:
    """A hash of (seed, window index) in [0, seq_len): splitmix64, vectorised, stateless."""
    with np.errstate(over="ignore"):
        z = idx.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(seq_len)).astype(np.int64)


class TokenWindows(Dataset):
    """Windows of `seq_len + 1` tokens of a token file: inputs are the first seq_len, targets the last."""

    def __init__(
        self,
        file: TokenFile,
        seq_len: int,
        vocab_size: int,
        start: int = 0,
        stop: int | None = None,
        seed: int | None = None,
    ):
        self.file, self.seq_len, self.vocab_size, self.seed = file, seq_len, vocab_size, seed
        self.start, self.stop = start, len(file) if stop is None else stop
        span = self.stop - self.start
        # random offsets need one window of slack at the end: start + jitter + seq_len + 1 <= stop
        self.n = (span // seq_len - 1) if seed is not None else (span - 1) // seq_len

    def __len__(self) -> int:
        return max(self.n, 0)

    def starts(self, idx: Sequence[int]) -> np.ndarray:
        i = np.asarray(idx, dtype=np.int64)
        base = self.start + i * self.seq_len
        return base if self.seed is None else base + _jitter(self.seed, i, self.seq_len)

    def __getitem__(self, i: int):
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, idx: Sequence[int]):
        starts = self.starts(idx)
        w = self.file.tokens[starts[:, None] + np.arange(self.seq_len + 1)]  # one gather from the map
        self.file.check_vocab(w.ravel(), self.vocab_size, where=int(starts.min()) if len(starts) else 0)
        w = torch.from_numpy(w.astype(np.int64))
        return w[:, :-1], w[:, 1:]


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DgtrainError(
            f"data.meta_path={path}: not a readable JSON file ({e}). Expected for example "
            '{"vocab_size": 50257, "dtype": "uint16"}.'
        ) from e
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int) or meta["vocab_size"] < 1:
        raise DgtrainError(
            f"data.meta_path={path}: needs a positive integer `vocab_size`, for example "
            '{"vocab_size": 50257, "dtype": "uint16"}.'
        )
    if meta.get("dtype") not in (None, *DTYPES):
        raise DgtrainError(f"data.meta_path={path}: dtype={meta['dtype']!r}; expected uint16 or uint32.")
    return meta


def tokens(
    *,
    seed: int,
    train_path: str,
    val_path: str | None = None,
    vocab_size: int | None = None,
    meta_path: str | None = None,
    dtype: str | None = None,
    seq_len: int = 1024,
    val_fraction: float = 0.1,
) -> DataBundle:
    """Language modelling over token files. Without `val_path`, the last `val_fraction` of the train file
    is held out, contiguously (random windows across the cut would leak validation text)."""
    if dtype is not None and dtype not in DTYPES:
        raise DgtrainError(
            f"data.dtype={dtype!r}: expected uint16, uint32 or null (from the file / meta.json)."
        )
    if seq_len < 1:
        raise DgtrainError(f"data.seq_len={seq_len}: expected a positive number of tokens.")
    train_p = Path(train_path).expanduser()
    meta_p = Path(meta_path).expanduser() if meta_path else train_p.parent / "meta.json"
    meta: dict = {}
    if meta_path or meta_p.is_file():
        if not meta_p.is_file():
            raise DgtrainError(f"data.meta_path={meta_p}: file not found.")
        meta = read_meta(meta_p)
    dtype = dtype or meta.get("dtype")
    train = TokenFile(train_p, "data.train_path", dtype)
    val = TokenFile(Path(val_path).expanduser(), "data.val_path", dtype) if val_path else None
    vocab = (
        vocab_size or meta.get("vocab_size") or (LLMC_MAGIC_VOCAB.get(train.model) if train.model else None)
    )
    if not vocab:
        pkl = train_p.parent / "meta.pkl"
        hint = (
            f" {pkl} is a pickle, which dgtrain does not load; write its vocab_size as JSON once with "
            f"`python -c \"import pickle, json; m = pickle.load(open('{pkl}', 'rb')); "
            f"json.dump({{'vocab_size': m['vocab_size']}}, open('{pkl.with_suffix('.json')}', 'w'))\"` "
            "(only for a meta.pkl you trust)."
            if pkl.is_file()
            else ""
        )
        raise DgtrainError(
            f"data=tokens: the vocabulary size of {train_p} is unknown. Set data.vocab_size=N, or put a "
            f'meta.json ({{"vocab_size": N}}) beside it or at data.meta_path.{hint}'
        )
    vocab = int(vocab)
    if vocab > np.iinfo(train.dtype).max + 1:
        raise DgtrainError(
            f"data.vocab_size={vocab} does not fit in {train.dtype.name} tokens; the file must hold uint32 "
            "ids (data.dtype=uint32)."
        )
    for f in (train, val):
        if f is not None:
            f.check_vocab(np.asarray(f.tokens[:CHECK_HEAD]), vocab)
    if val is None:
        if not 0.0 < val_fraction < 1.0:
            raise DgtrainError(f"data.val_fraction={val_fraction}: expected a fraction in (0, 1).")
        cut = len(train) - int(len(train) * val_fraction)
        train_ds = TokenWindows(train, seq_len, vocab, 0, cut, seed=seed)
        val_ds = TokenWindows(train, seq_len, vocab, cut, None)
    else:
        train_ds = TokenWindows(train, seq_len, vocab, seed=seed)
        val_ds = TokenWindows(val, seq_len, vocab)
    for ds, name in ((train_ds, "train"), (val_ds, "validation")):
        if len(ds) < 1:
            raise DgtrainError(
                f"data=tokens: the {name} tokens of {ds.file.path} ({ds.stop - ds.start:,}) are too few for "
                f"data.seq_len={seq_len}; use a longer file or a shorter seq_len."
            )
    info = DataInfo(task="lm", vocab_size=vocab, max_len=seq_len)
    return DataBundle(train_ds, val_ds, info)


LLMC_MAGIC_VOCAB = {name: v for name, _, v in LLMC_MAGIC.values()}

__all__ = ["tokens"]
