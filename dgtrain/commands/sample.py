"""`dgtrain sample RUN_DIR`: text from a decoder LM (streamed as it is generated), or the output of a
seq2seq model for `--input "3 1 4 1 5"` (greedy, or `--beam N`). Generation lives in dgtrain/generation.py."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dgtrain.commands import add_run_options
from dgtrain.errors import DgtrainError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dgtrain sample",
        description="Generate text from a trained language model (data=text), or decode a sequence with a "
        "trained seq2seq transformer.",
    )
    p.add_argument("source", help="a run directory, a checkpoint (.pt) or a model.safetensors")
    lm = p.add_argument_group("language model")
    lm.add_argument("--prompt", default=None, help="text to continue (default: start from a newline)")
    lm.add_argument("--prompt-file", default=None, metavar="FILE", help="read the prompt from a UTF-8 file")
    lm.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: 200)")
    lm.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    lm.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    lm.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set of mass p")
    lm.add_argument("--num-samples", type=int, default=1, help="independent samples (default: 1)")
    lm.add_argument("--seed", type=int, default=0, help="the same seed gives the same text (default: 0)")
    lm.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    s2s = p.add_argument_group("seq2seq")
    s2s.add_argument("--input", default=None, help='source symbols separated by spaces, e.g. "3 1 4 1 5"')
    s2s.add_argument("--beam", type=int, default=None, metavar="N", help="beam search with N beams")
    s2s.add_argument("--max-len", type=int, default=None, help="cap on output tokens (default: the data's)")
    add_run_options(p)
    return p


def _check(args) -> None:
    problems = []
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens={args.max_new_tokens}: must be at least 1.")
    if args.temperature < 0:
        problems.append(f"--temperature={args.temperature}: must be >= 0 (0 = greedy).")
    if args.top_k is not None and args.top_k < 1:
        problems.append(f"--top-k={args.top_k}: must be at least 1.")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        problems.append(f"--top-p={args.top_p}: must lie in (0, 1].")
    if args.num_samples < 1:
        problems.append(f"--num-samples={args.num_samples}: must be at least 1.")
    if args.beam is not None and args.beam < 1:
        problems.append(f"--beam={args.beam}: must be at least 1.")
    if args.max_len is not None and args.max_len < 1:
        problems.append(f"--max-len={args.max_len}: must be at least 1 (output tokens).")
    if args.prompt is not None and args.prompt_file is not None:
        problems.append("--prompt and --prompt-file: give one of them.")
    if problems:
        raise DgtrainError(" ".join(problems))


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    _check(args)
    prompt = args.prompt
    if args.prompt_file is not None:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DgtrainError(
                f"--prompt-file={args.prompt_file}: cannot be read as UTF-8 text ({e})."
            ) from e

    from dgtrain.runs import load_run

    run = load_run(Path(args.source), args.device, tuple(args.allow_target), data=False)
    task = run.info["task"]
    if task == "lm":
        if args.input is not None or args.beam is not None:
            raise DgtrainError(f"{args.source}: a language model; --input/--beam are for seq2seq runs.")
        return _sample_lm(run, args, prompt or "")
    if task == "seq2seq":
        if args.input is None:
            raise DgtrainError(
                f'{args.source}: a seq2seq model needs --input "3 1 4 1 5" (source symbols separated by spaces).'
            )
        return _sample_seq2seq(run, args)
    raise DgtrainError(
        f"{args.source}: a {task} model does not generate; dgtrain sample takes language-model (data=text) "
        "and seq2seq runs. Use dgtrain predict to score new data."
    )


def _sample_lm(run, args, prompt: str) -> int:
    import torch

    from dgtrain.generation import Vocab, generate_lm

    vocab = Vocab.from_extra(run.extra)
    ids = vocab.encode(prompt) or [vocab.start_token()]
    block = int(run.info.get("max_len") or 0) or None
    out = sys.stdout
    total_tokens, total_s = 0, 0.0
    for i in range(args.num_samples):
        g = torch.Generator(device=run.device).manual_seed(args.seed + i)
        decode = vocab.decoder()
        if args.num_samples > 1:
            out.write(f"--- sample {i + 1}/{args.num_samples} (seed {args.seed + i})\n")
        out.write(prompt)
        out.flush()

        def stream(tok: torch.Tensor, decode=decode) -> None:
            out.write(decode(tok.tolist()))  # one token: the host copy is the point of streaming
            out.flush()

        t0 = time.perf_counter()
        generate_lm(
            run.model,
            torch.tensor([ids], device=run.device),
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=g,
            block=block,
            use_cache=not args.no_cache,
            on_token=stream,
        )
        total_s += time.perf_counter() - t0
        total_tokens += args.max_new_tokens
        out.write("\n")
    print(
        f"[{total_tokens} tokens in {total_s:.2f} s, {total_tokens / max(total_s, 1e-9):,.0f} tokens/s, "
        f"{'no cache' if args.no_cache else 'KV cache'}, {vocab.level} vocabulary of {len(vocab)}]",
        file=sys.stderr,
    )
    return 0


def _sample_seq2seq(run, args) -> int:
    import torch

    from dgtrain.generation import beam_search

    extra, model = run.extra, run.model
    first = int(extra.get("first_symbol", 3))
    n_sym = int(extra.get("num_symbols", run.info["vocab_size"] - first))
    try:
        symbols = [int(t) for t in args.input.split()]
    except ValueError:
        raise DgtrainError(
            f'--input={args.input!r}: expected integers separated by spaces, e.g. --input "3 1 4 1 5".'
        ) from None
    bad = [s for s in symbols if not 0 <= s < n_sym]
    if not symbols or bad:
        raise DgtrainError(
            f"--input={args.input!r}: symbols must be integers in 0..{n_sym - 1} (the run's data.num_symbols="
            f"{n_sym})" + (f"; {bad} are not." if bad else "; the input is empty.")
        )
    max_pos = int(model.max_positions)
    if len(symbols) + 1 > max_pos:
        raise DgtrainError(f"--input: {len(symbols)} symbols exceed the model's max_positions={max_pos}.")
    if args.max_len is not None and args.max_len > max_pos - 1:  # positions past the model's table
        raise DgtrainError(
            f"--max-len={args.max_len}: the model has max_positions={max_pos}, so at most {max_pos - 1} output "
            "tokens (one position is the start token)."
        )
    if args.beam is not None and args.beam > int(model.vocab_size):
        raise DgtrainError(f"--beam={args.beam}: at most the vocabulary size ({model.vocab_size} tokens).")
    src = torch.tensor([[s + first for s in symbols] + [model.eos_id]], device=run.device)
    max_len = args.max_len or min(max_pos - 1, max(int(run.info.get("max_len") or 0), len(symbols) + 2))

    def show(tokens: list[int]) -> str:
        shown = []
        for t in tokens:
            if t == model.eos_id:
                break
            shown.append(str(t - first) if t >= first else "<pad>" if t == model.pad_id else "<bos>")
        return " ".join(shown)

    task = extra.get("seq_task")
    print(f"input   {' '.join(map(str, symbols))}" + (f"   (task: {task})" if task else ""))
    greedy = model.generate(src, max_len=max_len)[0].tolist()
    print(f"greedy  {show(greedy)}")
    if args.beam:
        for rank, (tokens, score) in enumerate(beam_search(model, src, args.beam, max_len), start=1):
            print(f"beam {rank:<2} {show(tokens)}   (log-prob {score:.3f})")
    return 0
