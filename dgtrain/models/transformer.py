"""`transformer`: an encoder-decoder for sequence-to-sequence, or a decoder-only causal LM.

Attention goes through `F.scaled_dot_product_attention`, which picks a fused kernel (flash or
memory-efficient on CUDA) when the masks allow it. Blocks are pre-norm for stable training.

Two opt-in paths leave training untouched: a KV cache for generation (`decode(..., cache=[])` keeps
each decoder layer's keys and values, so a new token attends to the prefix without recomputing it),
and `attention_maps`, which computes attention explicitly to return its weights (`dgtrain explain`).

`activation_checkpointing=True` keeps only each block's input for backward and recomputes the block's
inside during backward (`torch.utils.checkpoint`, non-reentrant): less memory for one more forward per
block. The RNG state is replayed, so dropout draws the same masks and the gradients are unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dgtrain.data import DataInfo
from dgtrain.errors import DgtrainError

ARCHS = ("encdec", "decoder")
INITS = ("default", "gpt2")


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise DgtrainError(f"model.d_model={d_model} must be divisible by model.n_heads={n_heads}.")
        self.n_heads, self.dropout = n_heads, dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, H, T, D/H)
        b, t, d = x.shape
        return x.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        causal: bool = False,
        cache: dict | None = None,
        weights: list | None = None,
    ) -> torch.Tensor:
        """key_mask: (B, S) bool, True where the key is a real token (False = padding).

        cache (self-attention only): a dict holding this layer's keys and values of the tokens seen so far;
        the new keys and values are appended, and the queries (the new tokens) attend to all of them.
        weights: a list that receives the (B, H, T, S) attention weights (computed explicitly, not fused)."""
        context = x if context is None else context
        q = self._heads(self.q_proj(x))
        k, v = (self._heads(t) for t in self.kv_proj(context).chunk(2, dim=-1))
        past = 0
        if cache is not None:
            if "k" in cache:
                past = cache["k"].shape[2]
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        if causal and past:
            # queries sit at positions past..past+T-1: each sees the cache and the new tokens up to itself
            t = q.shape[2]
            attn_mask = (
                None if t == 1 else torch.ones(t, past + t, dtype=torch.bool, device=q.device).tril(past)
            )
            causal = False
        if weights is not None:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if causal:
                t, s_len = scores.shape[-2:]
                attn_mask = torch.ones(t, s_len, dtype=torch.bool, device=q.device).tril(s_len - t)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            w = scores.softmax(-1)
            weights.append(w)
            out = w @ v
        else:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                is_causal=causal,
                dropout_p=self.dropout if self.training else 0.0,
            )
        b, _, t, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Sequential):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model), nn.Dropout(dropout))


class EncoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None, weights: list | None = None
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), key_mask=key_mask, weights=weights))
        return x + self.ff(self.ln2(x))


class DecoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, cross: bool):
        super().__init__()
        self.ln1, self.ln3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model) if cross else None
        self.cross_attn = MultiHeadAttention(d_model, n_heads, dropout) if cross else None
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        cache: dict | None = None,
        weights: list | None = None,
    ) -> torch.Tensor:
        # The causal mask alone suffices for target padding: padding only ever follows real tokens,
        # so no real query can see it, and outputs at padded positions are ignored by the loss.
        x = x + self.drop(self.self_attn(self.ln1(x), causal=True, cache=cache, weights=weights))
        if self.cross_attn is not None:
            x = x + self.drop(self.cross_attn(self.ln2(x), context=memory, key_mask=memory_mask))
        return x + self.ff(self.ln3(x))


class Transformer(nn.Module):
    tasks = ("seq2seq", "lm")

    def __init__(
        self,
        vocab_size: int,
        arch: str = "encdec",
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        d_ff: int | None = None,
        dropout: float = 0.1,
        max_positions: int = 512,
        pad_id: int | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        tie_weights: bool = False,
        head_bias: bool = True,
        init: str = "default",
        activation_checkpointing: bool = False,
        vocab_multiple: int = 1,
    ):
        super().__init__()
        if arch not in ARCHS:
            raise DgtrainError(f"model.arch={arch!r}: expected one of auto, {', '.join(ARCHS)}.")
        if init not in INITS:
            raise DgtrainError(f"model.init={init!r}: expected one of {', '.join(INITS)}.")
        self.arch, self.max_positions = arch, max_positions
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.activation_checkpointing = bool(activation_checkpointing)
        if int(vocab_multiple) < 1:
            raise DgtrainError(
                f"model.vocab_multiple={vocab_multiple}: expected a positive integer (1: no padding)."
            )
        # Embedding and head rows padded to a multiple (GPT-2's 50,257 -> 50,304 with 64) give matmul
        # shapes the GPU tiles well; the extra ids never occur in the data, so training pushes them down.
        self.vocab_size = vocab_size
        vocab_size = math.ceil(vocab_size / int(vocab_multiple)) * int(vocab_multiple)
        d_ff = d_ff or 4 * d_model
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_positions, d_model)
        self.drop = nn.Dropout(dropout)
        if arch == "encdec":
            self.encoder = nn.ModuleList(
                EncoderBlock(d_model, n_heads, d_ff, dropout) for _ in range(n_layers)
            )
            self.enc_ln = nn.LayerNorm(d_model)
        self.decoder = nn.ModuleList(
            DecoderBlock(d_model, n_heads, d_ff, dropout, cross=arch == "encdec") for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        # GPT-2 has no bias on its output head: without it, backward skips a reduction over every logit
        self.head = nn.Linear(d_model, vocab_size, bias=bool(head_bias))
        if init == "gpt2":
            self._gpt2_init(n_layers)
        # one matrix embeds tokens and scores them (GPT-2, nanoGPT); a head bias stays its own
        if tie_weights:
            self.head.weight = self.tok_emb.weight

    def _gpt2_init(self, n_layers: int) -> None:
        """GPT-2's init (as nanoGPT): weights N(0, 0.02), biases 0, and the projections that write into the
        residual stream (attention output, second feed-forward layer) N(0, 0.02 / sqrt(2 * n_layers)), so
        the residual's variance does not grow with depth."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        residual_std = 0.02 / (2 * n_layers) ** 0.5
        for m in self.modules():
            if isinstance(m, MultiHeadAttention):
                nn.init.normal_(m.out_proj.weight, mean=0.0, std=residual_std)
            elif isinstance(m, FeedForward):
                nn.init.normal_(m[2].weight, mean=0.0, std=residual_std)

    @classmethod
    def from_data(cls, info: DataInfo, arch: str = "auto", **params) -> Transformer:
        wanted = {"seq2seq": "encdec", "lm": "decoder"}[info.task]
        if arch == "auto":
            arch = wanted
        elif arch != wanted:
            raise DgtrainError(
                f"model.arch={arch} cannot learn {info.task} data; use model.arch={wanted} "
                "(or model.arch=auto)."
            )
        max_positions = params.get("max_positions", 512)
        if info.max_len > max_positions:
            raise DgtrainError(
                f"sequences reach {info.max_len} tokens but model.max_positions={max_positions}; "
                f"raise model.max_positions to at least {info.max_len}."
            )
        return cls(
            info.vocab_size, arch=arch, pad_id=info.pad_id, bos_id=info.bos_id, eos_id=info.eos_id, **params
        )

    def _embed(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        t = offset + tokens.shape[1]
        if t > self.max_positions:
            raise ValueError(f"sequence of {t} tokens exceeds model.max_positions={self.max_positions}")
        pos = torch.arange(offset, t, device=tokens.device)
        return self.drop(self.tok_emb(tokens) + self.pos_emb(pos))

    def _run(self, block: nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
        """One block; under activation checkpointing in training (never with a KV cache or attention
        weights to collect, whose side effects a recomputation would repeat)."""
        plain = all(a is None or isinstance(a, torch.Tensor) for a in args)
        if self.activation_checkpointing and self.training and torch.is_grad_enabled() and plain:
            return checkpoint(block, x, *args, use_reentrant=False)
        return block(x, *args)

    def encode(
        self, src: torch.Tensor, weights: list | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        src_mask = None if self.pad_id is None else src != self.pad_id
        x = self._embed(src)
        for block in self.encoder:
            x = self._run(block, x, src_mask, weights)
        return self.enc_ln(x), src_mask

    def decode(
        self,
        tokens: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        cache: list[dict] | None = None,
        weights: list | None = None,
    ) -> torch.Tensor:
        """Logits for each of `tokens`. With `cache` (a list, empty at first, one dict per layer once
        used), `tokens` continue the tokens already cached: pass only the new ones."""
        if cache is not None and not cache:
            cache.extend({} for _ in self.decoder)
        offset = cache[0]["k"].shape[2] if cache and "k" in cache[0] else 0
        x = self._embed(tokens, offset)
        for i, block in enumerate(self.decoder):
            x = self._run(block, x, memory, memory_mask, None if cache is None else cache[i], weights)
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def attention_maps(
        self, src: torch.Tensor, tgt_in: torch.Tensor | None = None
    ) -> dict[str, list[torch.Tensor]]:
        """Attention weights per layer, each (B, heads, queries, keys): decoder self-attention, and for
        encdec the encoder self-attention too. Computed explicitly, outside the fused training path."""
        maps: dict[str, list[torch.Tensor]] = {}
        if self.arch == "decoder":
            maps["decoder"] = []
            self.decode(src, weights=maps["decoder"])
            return maps
        maps["encoder"], maps["decoder"] = [], []
        memory, src_mask = self.encode(src, weights=maps["encoder"])
        self.decode(tgt_in, memory, src_mask, weights=maps["decoder"])
        return maps

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor | None = None) -> torch.Tensor:
        """encdec: logits for each position of `tgt_in` (teacher forcing). decoder: next-token logits of `src`."""
        if self.arch == "decoder":
            return self.decode(src)
        memory, src_mask = self.encode(src)
        return self.decode(tgt_in, memory, src_mask)

    @torch.no_grad()
    def generate(self, src: torch.Tensor, max_len: int) -> torch.Tensor:
        """Greedy decoding for encdec: returns (B, <= max_len) tokens after BOS; stops once all hit EOS."""
        memory, src_mask = self.encode(src)
        ys = torch.full((src.shape[0], 1), self.bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            nxt = self.decode(ys, memory, src_mask)[:, -1, : self.vocab_size].argmax(-1)  # never a padding id
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            ys = torch.cat([ys, nxt[:, None]], dim=1)
            done |= nxt == self.eos_id
            if bool(done.all()):
                break
        return ys[:, 1:]
