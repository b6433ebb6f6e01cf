"""Generation with and without the KV cache: same tokens, time per token.

    python scripts/bench_kv_cache.py [--tokens 256] [--d-model 64] [--layers 2] [--context 512] [--device cpu]

The model is the char-LM recipe's transformer (random weights: speed does not depend on training). Both
paths generate greedily from the same prompt; the script checks that they produce the same tokens, then
reports tokens/s and the speed-up. With the cache, each new token runs the network on one position
against the cached keys and values; without it, on the whole context (quadratic in the length).
"""

from __future__ import annotations

import argparse
import time

import torch

from dgtrain.generation import generate_lm
from dgtrain.models.transformer import Transformer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256, help="new tokens per run")
    p.add_argument("--prompt", type=int, default=16, help="prompt length")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=94)
    p.add_argument("--context", type=int, default=512, help="window (max_positions); no restart below it")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="best of N")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.manual_seed(0)
    model = Transformer(
        a.vocab,
        arch="decoder",
        d_model=a.d_model,
        n_heads=a.heads,
        n_layers=a.layers,
        max_positions=a.context,
    )
    model = model.to(a.device).eval()
    prompt = torch.randint(0, a.vocab, (a.batch, a.prompt), device=a.device)

    def run(cache: bool) -> tuple[torch.Tensor, float]:
        best, out = float("inf"), None
        for _ in range(a.repeats):
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = generate_lm(model, prompt, a.tokens, temperature=0, block=a.context, use_cache=cache)
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return out, best

    run(True)  # warm-up
    with_cache, t_cache = run(True)
    without, t_full = run(False)
    same = torch.equal(with_cache, without)
    n = a.tokens * a.batch
    print(
        f"torch {torch.__version__} | {a.device} | {torch.get_num_threads()} thread(s) | d_model={a.d_model} "
        f"layers={a.layers} heads={a.heads} | prompt {a.prompt} + {a.tokens} new tokens, batch {a.batch}"
    )
    print(f"KV cache   {t_cache * 1000:8.1f} ms  {n / t_cache:8,.0f} tokens/s")
    print(f"no cache   {t_full * 1000:8.1f} ms  {n / t_full:8,.0f} tokens/s")
    print(f"speed-up   {t_full / t_cache:.2f}x   identical tokens: {same}")
    if not same:
        raise SystemExit("the cached and uncached paths generated different tokens")


if __name__ == "__main__":
    main()
