"""Generation from trained transformers: text from a decoder LM (sampling, with or without the KV cache)
and sequences from an encoder-decoder (greedy, beam search). `dgtrain sample` and `trainer.sample_every`
both come here.

The context window: a model trained on windows of `block` tokens (data.seq_len) sees at most `block`
tokens. When the text outgrows the window, the context restarts from its last `block // 2` tokens (one
re-read of those, then the cache grows again). The cached and uncached paths follow the same rule, so
they produce the same tokens; the uncached path recomputes the whole context for every new token.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from typing import Any

import torch

from dgtrain.errors import DgtrainError


class Vocab:
    """The run's own tokenisation: `char` (the characters of the training corpus, index = position in the
    stored vocabulary string) or `byte` (UTF-8 bytes, 256 tokens)."""

    def __init__(self, level: str, chars: str = ""):
        self.level, self.chars = level, chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> Vocab:
        if not extra.get("level") and "vocab" not in extra:  # data=tokens: ids of someone else's tokenizer
            raise DgtrainError(
                "this language model was trained on token ids (data=tokens) from a tokenizer dgtrain does not "
                "keep, so it can neither encode a prompt nor turn the generated ids into text; dgtrain sample "
                "and trainer.sample_every take data=text runs (char or byte vocabulary)."
            )
        level = extra.get("level") or "char"
        if level == "char" and not extra.get("vocab"):
            raise DgtrainError(
                "this run stored no character vocabulary (data_info.json has no extra.vocab); it was trained "
                "before dgtrain kept it. Train it again, or sample from a byte-level run."
            )
        return cls(level, extra.get("vocab", ""))

    def __len__(self) -> int:
        return len(self.chars) if self.level == "char" else 256

    def encode(self, text: str) -> list[int]:
        if self.level == "byte":
            return list(text.encode("utf-8"))
        unknown = sorted({c for c in text if c not in self.index})
        if unknown:
            raise DgtrainError(
                f"the prompt holds character(s) {''.join(unknown)!r} that the run's vocabulary "
                f"({len(self.chars)} characters of its training text) does not contain; remove them."
            )
        return [self.index[c] for c in text]

    def decoder(self) -> Callable[[list[int]], str]:
        """A streaming decoder: feed token ids as they come, get the text they complete (bytes that split
        a UTF-8 character wait for the rest)."""
        if self.level == "char":
            return lambda ids: "".join(self.chars[i] for i in ids)
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda ids: dec.decode(bytes(ids))

    def decode(self, ids: list[int]) -> str:
        if self.level == "char":
            return "".join(self.chars[i] for i in ids)
        return bytes(ids).decode("utf-8", errors="replace")

    def start_token(self) -> int:
        """The token an empty prompt starts from: a newline (or the first symbol when there is none)."""
        return self.index.get("\n", 0) if self.level == "char" else 10


def next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B,) tokens. Temperature 0 is greedy (argmax); top-k keeps the k likeliest tokens;
    top-p keeps the smallest set whose probability reaches p (nucleus sampling)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate_lm(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    block: int | None = None,
    use_cache: bool = True,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """(B, T) prompt -> (B, T + max_new_tokens) tokens. `block`: the context window (default: the
    model's max_positions). `on_token` receives each new (B,) token tensor as it is chosen (streaming)."""
    block = min(block or model.max_positions, model.max_positions)
    tokens = prompt
    start = max(0, tokens.shape[1] - block)
    cache: list[dict] | None = [] if use_cache else None
    for _ in range(max_new_tokens):
        if tokens.shape[1] - start > block:  # the window is full: restart it from its last half
            start = tokens.shape[1] - max(1, block // 2)
            if cache is not None:
                cache.clear()
        if cache is None:
            logits = model.decode(tokens[:, start:])
        elif not cache:
            logits = model.decode(tokens[:, start:], cache=cache)  # prefill the cache with the context
        else:
            logits = model.decode(tokens[:, -1:], cache=cache)  # one new token against the cached prefix
        nxt = next_token(
            logits[:, -1, : model.vocab_size], temperature, top_k, top_p, generator
        )  # no padding ids
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if on_token is not None:
            on_token(nxt)
    return tokens


@torch.no_grad()
def beam_search(model, src: torch.Tensor, beam: int, max_len: int) -> list[tuple[list[int], float]]:
    """Beam search for one source sequence (1, S) of an encoder-decoder: the `beam` best hypotheses as
    (tokens after BOS, up to and including EOS; summed log-probability), best first. beam=1 is greedy."""
    memory, mask = model.encode(src)
    hyps: list[tuple[list[int], float, bool]] = [([model.bos_id], 0.0, False)]
    for _ in range(max_len):
        alive = [h for h in hyps if not h[2]]
        if not alive:
            break
        ys = torch.tensor([h[0] for h in alive], device=src.device)
        n = len(alive)
        logp = model.decode(ys, memory.expand(n, -1, -1), None if mask is None else mask.expand(n, -1))
        logp = logp[:, -1, : model.vocab_size].float().log_softmax(-1)  # never a padding id
        top = logp.topk(beam, dim=-1)
        candidates = [h for h in hyps if h[2]]
        for i, (seq, score, _) in enumerate(alive):
            for lp, tok in zip(top.values[i].tolist(), top.indices[i].tolist(), strict=True):
                candidates.append((seq + [tok], score + lp, tok == model.eos_id))
        hyps = sorted(candidates, key=lambda h: -h[1])[:beam]
    return [(h[0][1:], h[1]) for h in hyps]


@torch.no_grad()
def lm_sample(model, info, step: int, max_new_tokens: int = 200, temperature: float = 0.8) -> str:
    """`trainer.sample_every`: a short text from a newline, seeded by the step (it draws from its own
    generator, so the training run's random state is untouched)."""
    vocab = Vocab.from_extra(info.extra)
    model = getattr(model, "module", model)  # DDP wraps the transformer; generation needs its methods
    model = getattr(model, "_orig_mod", model)  # so does torch.compile
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(step)
    was_training = model.training
    model.eval()
    try:
        prompt = torch.tensor([[vocab.start_token()]], device=device)
        out = generate_lm(
            model, prompt, max_new_tokens, temperature=temperature, generator=g, block=info.max_len or None
        )
    finally:
        model.train(was_training)
    return vocab.decode(out[0, 1:].tolist())
