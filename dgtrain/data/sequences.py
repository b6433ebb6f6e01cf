"""Sequence data: `seq2seq_synthetic` (copy / reverse / sort, a new length per example) and `text`
(a character- or byte-level language model over any text file).

Seq2seq batches are padded only to their own longest sequence, so every batch builds a graph of its
own shape: the define-by-run case that static-graph tools handle badly. `data.pad_to_multiple=N` rounds
each batch's widths up to a multiple of N (the target's to a multiple plus one: the decoder reads and
predicts it shifted by one), so a run meets at most ceil(longest / N) widths per tensor
(docs/performance.md, `trainer.compile`).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from dgtrain.data import (
    DataBundle,
    DataInfo,
    EpochBatchSampler,
    InMemory,
    epoch_generator,
    limit,
    split_indices,
)
from dgtrain.errors import DgtrainError

PAD, BOS, EOS = 0, 1, 2
N_SPECIAL = 3
SEQ2SEQ_TASKS = ("copy", "reverse", "sort")


def round_up(n: int, multiple: int | None) -> int:
    """`n` rounded up to a multiple of `multiple` (None or 1: `n` itself)."""
    m = multiple or 1
    return -(-n // m) * m


def check_pad_to_multiple(value) -> int | None:
    """`data.pad_to_multiple` as an int, or None; a clear error for anything but a positive integer."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DgtrainError(
            f"data.pad_to_multiple={value!r}: must be a positive integer (8 rounds every batch's sequence "
            "length up to a multiple of 8), or null to pad each batch only to its own longest sequence."
        )
    return value


class PaddedPairs(InMemory):
    """Variable-length (source, target) token sequences; a batch is padded to its own longest member,
    rounded up to a multiple of `pad_to_multiple` when that is set.

    Held as two matrices padded to the longest example (rounded up the same way, so a rounded width
    never exceeds them), with each example's lengths on the CPU: a batch gathers its rows and keeps the
    columns up to its own (rounded) longest member, exactly what padding the batch's sequences would
    give, and the host knows that width without asking the device."""

    def __init__(
        self,
        pairs: list[tuple[torch.Tensor, torch.Tensor]],
        pad_id: int = PAD,
        pad_to_multiple: int | None = None,
    ):
        self.pairs, self.pad_id = pairs, pad_id
        self.multiple = check_pad_to_multiple(pad_to_multiple)
        # the decoder reads the target less its last token (and predicts it less its first): the target's
        # width is rounded to a multiple plus one, so that what the model sees is a multiple
        self.src = self._padded([s for s, _ in pairs], 0)
        self.tgt = self._padded([t for _, t in pairs], 1)
        # host metadata (numpy): a batch's width is known without reading a tensor, on any device
        self.src_len = np.array([len(s) for s, _ in pairs], dtype=np.int64)
        self.tgt_len = np.array([len(t) for _, t in pairs], dtype=np.int64)
        self.device = self.src.device

    def width(self, longest: int, shift: int) -> int:
        """A batch's width for its longest member: rounded to a multiple of `pad_to_multiple`, plus `shift`."""
        return round_up(longest - shift, self.multiple) + shift

    def _padded(self, seqs: list[torch.Tensor], shift: int) -> torch.Tensor:
        m = pad_sequence(seqs, batch_first=True, padding_value=self.pad_id)
        extra = self.width(m.shape[1], shift) - m.shape[1]
        return torch.nn.functional.pad(m, (0, extra), value=self.pad_id) if extra else m

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        return self.pairs[i]

    def take(self, idx, idx_host):
        rows = idx_host.numpy()
        width_src, width_tgt = int(self.src_len[rows].max()), int(self.tgt_len[rows].max())
        width_src, width_tgt = self.width(width_src, 0), self.width(width_tgt, 1)
        return self.src[idx, :width_src], self.tgt[idx, :width_tgt]

    def to(self, device):
        moved = copy.copy(self)
        moved.src, moved.tgt, moved.device = self.src.to(device), self.tgt.to(device), torch.device(device)
        return moved

    def nbytes(self) -> int:
        return self.src.nbytes + self.tgt.nbytes


def seq2seq_synthetic(
    *,
    seed: int,
    seq_task: str = "reverse",
    num_examples: int = 8000,
    num_symbols: int = 10,
    min_len: int = 3,
    max_len: int = 12,
    val_fraction: float = 0.1,
    max_examples: int | None = None,
    pad_to_multiple: int | None = None,
) -> DataBundle:
    """Source: random symbols + EOS. Target: BOS + f(symbols) + EOS, f being copy, reverse or sort.
    `pad_to_multiple`: each batch's widths round up to a multiple of it (pad tokens, which the loss and
    the metrics ignore), so a compiled model meets a few shapes only."""
    pad_to_multiple = check_pad_to_multiple(pad_to_multiple)
    if seq_task not in SEQ2SEQ_TASKS:
        raise DgtrainError(f"data.seq_task={seq_task!r}: expected one of {', '.join(SEQ2SEQ_TASKS)}.")
    if not 1 <= min_len <= max_len:
        raise DgtrainError(f"data.min_len={min_len}, data.max_len={max_len}: need 1 <= min_len <= max_len.")
    g = torch.Generator().manual_seed(seed + 1)
    n = limit(num_examples, max_examples)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    eos, bos = torch.tensor([EOS]), torch.tensor([BOS])
    pairs = []
    for length in lengths.tolist():
        sym = torch.randint(N_SPECIAL, N_SPECIAL + num_symbols, (length,), generator=g)
        out = {"copy": sym, "reverse": sym.flip(0), "sort": sym.sort().values}[seq_task]
        pairs.append((torch.cat([sym, eos]), torch.cat([bos, out, eos])))
    train_idx, val_idx = split_indices(n, val_fraction, seed)
    info = DataInfo(
        task="seq2seq",
        vocab_size=N_SPECIAL + num_symbols,
        pad_id=PAD,
        bos_id=BOS,
        eos_id=EOS,
        max_len=round_up(max_len + 2, pad_to_multiple),  # the widest batch, padding included
        extra={"seq_task": seq_task, "num_symbols": num_symbols, "first_symbol": N_SPECIAL},
    )
    return DataBundle(
        PaddedPairs([pairs[i] for i in train_idx.tolist()], pad_to_multiple=pad_to_multiple),
        PaddedPairs([pairs[i] for i in val_idx.tolist()], pad_to_multiple=pad_to_multiple),
        info,
    )


# ------------------------------------------------------------------------------------------------ text

# The default corpus is real English prose that exists on every machine with Python: the docstrings
# of these standard-library modules, in a fixed order. Point data.path at any text file instead.
DEFAULT_CORPUS_MODULES = (
    "argparse",
    "bisect",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "fractions",
    "functools",
    "heapq",
    "itertools",
    "json",
    "logging",
    "pathlib",
    "random",
    "shutil",
    "statistics",
    "string",
    "tempfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
)


def default_corpus() -> str:
    seen: set[str] = set()
    parts: list[str] = []
    with warnings.catch_warnings():  # reading docstrings touches deprecated aliases (typing.re, ...)
        warnings.simplefilter("ignore")
        for name in DEFAULT_CORPUS_MODULES:
            _collect_docs(name, seen, parts)
    return "\n\n".join(parts)


def _collect_docs(name: str, seen: set[str], parts: list[str]) -> None:
    """Append the docstrings of a module and of its public classes and functions, each once."""
    mod = importlib.import_module(name)
    for obj in [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]:
        if not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        doc = inspect.getdoc(obj)
        if doc and len(doc) > 40 and doc not in seen:
            seen.add(doc)
            parts.append(doc)


class TokenWindows(InMemory):
    """Consecutive windows of `seq_len + 1` tokens; input is the first seq_len, target the last."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.n = (len(tokens) - 1) // seq_len
        self.device = tokens.device
        self.offsets = torch.arange(seq_len + 1, device=tokens.device)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        w = self.tokens[i * self.seq_len : (i + 1) * self.seq_len + 1]
        return w[:-1], w[1:]

    def take(self, idx, idx_host):
        w = self.tokens[(idx * self.seq_len).unsqueeze(1) + self.offsets]
        return w[:, :-1], w[:, 1:]

    def to(self, device):
        return type(self)(self.tokens.to(device), self.seq_len)

    def nbytes(self) -> int:
        return self.tokens.nbytes


class RandomWindows(TokenWindows):
    """Training windows that start at any token, drawn afresh each epoch (nanoGPT's `get_batch`). An
    epoch is as many windows as the fixed split has, in full batches only. Its indices are start
    positions (from RandomStartSampler), not window numbers."""

    def take(self, idx, idx_host):
        w = self.tokens[idx.unsqueeze(1) + self.offsets]
        return w[:, :-1], w[:, 1:]

    def batch_sampler(self, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> RandomStartSampler:
        return RandomStartSampler(len(self.tokens) - self.seq_len, self.n, batch_size, seed, rank, world)


class RandomStartSampler(EpochBatchSampler):
    """Batches of random start positions; epoch e draws from `epoch_generator(seed, e)`, so resuming at
    (epoch, batch k) reproduces the same windows without saved RNG state."""

    def __init__(
        self, n_starts: int, per_epoch: int, batch_size: int, seed: int, rank: int = 0, world: int = 1
    ):
        super().__init__(
            n_starts, batch_size, shuffle=True, seed=seed, drop_last=True, rank=rank, world=world
        )
        self.batches = max(1, per_epoch // self.global_batch)  # each rank takes its shard of a global batch

    def __len__(self) -> int:
        return self.batches if self.max_batches is None else max(1, min(self.batches, self.max_batches))

    def order(self, epoch: int) -> torch.Tensor:
        """Epoch `epoch`'s start positions, batch after batch (drawn with replacement)."""
        g = epoch_generator(self.seed, epoch)
        return torch.randint(self.n, (self.batches * self.global_batch,), generator=g)


SAMPLINGS = ("random", "sequential")


def text(
    *,
    seed: int,
    path: str | None = None,
    level: str = "char",
    seq_len: int = 64,
    val_fraction: float = 0.1,
    max_chars: int | None = None,
    sampling: str = "random",
) -> DataBundle:
    """A language-modelling corpus. The split is contiguous (the last `val_fraction` of the text), since
    overlapping random windows would leak validation text into training. Training windows start at random
    tokens (`sampling=random`, as nanoGPT) or are the fixed consecutive windows (`sequential`); validation
    always uses the fixed windows, so every evaluation scores the same text."""
    if sampling not in SAMPLINGS:
        raise DgtrainError(f"data.sampling={sampling!r}: expected one of {', '.join(SAMPLINGS)}.")
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DgtrainError(
                f"data.path={path}: file not found. Expected a UTF-8 text file "
                "(or leave data.path unset to use the built-in corpus)."
            )
        raw = p.read_bytes()
        if level == "char":
            try:
                corpus = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DgtrainError(
                    f"data.path={p}: not valid UTF-8 ({e}). Use data.level=byte for binary "
                    "or other encodings."
                ) from e
    else:
        corpus = default_corpus()
        raw = corpus.encode("utf-8")
    if level == "char":
        corpus = corpus[: limit(len(corpus), max_chars)]
        vocab = sorted(set(corpus))
        index = {c: i for i, c in enumerate(vocab)}
        tokens = torch.tensor([index[c] for c in corpus], dtype=torch.long)
        extra = {"level": "char", "vocab": "".join(vocab)}
    elif level == "byte":
        raw = raw[: limit(len(raw), max_chars)]
        tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        vocab, extra = range(256), {"level": "byte"}
    else:
        raise DgtrainError(f"data.level={level!r}: expected 'char' or 'byte'.")
    n_val = int(len(tokens) * val_fraction)
    if n_val < seq_len + 1 or len(tokens) - n_val < seq_len + 1:
        raise DgtrainError(
            f"data=text: the corpus ({len(tokens)} tokens) is too short for data.seq_len={seq_len} "
            f"with data.val_fraction={val_fraction}; use a longer file or a shorter seq_len."
        )
    windows = RandomWindows if sampling == "random" else TokenWindows
    train, val = windows(tokens[:-n_val], seq_len), TokenWindows(tokens[-n_val:], seq_len)
    info = DataInfo(task="lm", vocab_size=len(vocab), max_len=seq_len, extra=extra)
    return DataBundle(train, val, info)


__all__ = ["seq2seq_synthetic", "text", "split_indices"]
