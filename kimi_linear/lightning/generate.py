"""``kimi-linear generate``: stream a continuation of a prompt from a checkpoint.

The model and its tokenizer come from :mod:`.load` (a Lightning checkpoint, a sharded folder or
an exported / released folder, with the tokenizer the model was trained with); decoding is
:meth:`KimiLinearForCausalLM.generate` (greedy with ``--temperature 0``, sampled otherwise);
time to first token and tokens/s go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from kimi_linear.errors import PROG, UsageError
from kimi_linear.lightning.load import MISMATCH_HELP, TOKENIZER_HELP, load_model, resolve_tokenizer

__all__ = ["generate_main"]


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} generate",
        description="Continue --prompt with a checkpoint (a Lightning .ckpt, a sharded checkpoint "
        "folder or an exported / released folder), using the tokenizer the model was trained "
        "with (recorded in the checkpoint, or the folder's tokenizer files; --tokenizer "
        "overrides it). One prompt and one sample are printed token by token as they are "
        "generated; several are printed when all are done. Time to first token and tokens/s "
        "go to stderr. Decoding: --temperature 0 is greedy (argmax, deterministic); a "
        "temperature > 0 samples from the softmax at that temperature, optionally restricted "
        "to the --top_k most likely tokens and / or the --top_p nucleus, reproducibly from "
        "--seed.",
    )
    p.add_argument(
        "--ckpt_path",
        required=True,
        help="Lightning checkpoint file, sharded checkpoint folder, or exported model folder",
    )
    p.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    p.add_argument("--allow_tokenizer_mismatch", action="store_true", help=MISMATCH_HELP)
    p.add_argument(
        "--prompt",
        required=True,
        action="append",
        help="prompt text (the tokenizer's <bos> token, if it has one, is prepended); repeat the "
        "flag for several prompts, "
        "generated together as one left-padded batch",
    )
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        help="0: greedy decoding (argmax); > 0: sampling at this temperature (default 0.8)",
    )
    p.add_argument(
        "--top_k", type=int, default=None, help="sample among the k most likely tokens only"
    )
    p.add_argument(
        "--top_p",
        type=float,
        default=None,
        help="nucleus sampling: the smallest set of tokens whose probability reaches p",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
    p.add_argument(
        "--no_stream",
        action="store_true",
        help="print the text when it is complete, not token by token",
    )
    p.add_argument("--device", default="cpu")
    return p


class _TextStream:
    """Print the text of one row of generated ids as the tokens arrive.

    Each new token re-decodes the ids so far and prints what the text grew by; a text that ends
    in an incomplete UTF-8 sequence (a U+FFFD at its end) waits for the next token.  Stops at
    ``eos_id``; ids past the tokenizer's vocabulary are skipped (counted in ``dropped``).
    """

    def __init__(self, tok: Any, out: Any = None) -> None:
        self.tok, self.out = tok, out if out is not None else sys.stdout
        self.ids: list[int] = []
        self.printed = ""
        self.done = False
        self.dropped = 0

    def put(self, token: int) -> None:
        if self.done:
            return
        if token == self.tok.eos_id:
            self.done = True
            return
        if token >= self.tok.vocab_size:
            self.dropped += 1
            return
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def _emit(self, text: str) -> None:
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed) :])
            self.out.flush()
        self.printed = text

    def end(self) -> None:
        self._emit(self.tok.decode(self.ids))
        self.out.write("\n")
        self.out.flush()


def generate_main(argv: list[str]) -> int:
    """``kimi-linear generate``: print ``--num_samples`` continuations of each ``--prompt``
    (prompts of different lengths run as one batch, left-padded with an attention mask); one
    continuation is streamed token by token.  Time to first token and tokens/s go to stderr."""
    args = _generate_parser().parse_args(argv)
    if args.max_new_tokens < 0:
        raise UsageError(f"--max_new_tokens must be >= 0, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise UsageError(f"--num_samples must be >= 1, got {args.num_samples}")
    model = load_model(args.ckpt_path, args.device).eval()
    tok = resolve_tokenizer(
        args.tokenizer,
        args.ckpt_path,
        model.config.vocab_size,
        allow_mismatch=args.allow_tokenizer_mismatch,
    )
    prompts = [text for text in args.prompt for _ in range(args.num_samples)]
    rows = [tok.encode(text, add_bos=tok.bos_id is not None) for text in prompts]
    for text, row in zip(prompts, rows):
        if not row:
            raise UsageError(
                f"--prompt {text!r} has no tokens (the tokenizer has no <bos> to start from)"
            )
    width = max(len(r) for r in rows)
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id  # masked out either way
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
    gen = torch.Generator(device=model.device).manual_seed(args.seed)
    stream = _TextStream(tok) if len(prompts) == 1 and not args.no_stream else None
    times: list[float] = []

    def on_tokens(tokens: torch.Tensor) -> None:
        if stream is not None:
            stream.put(int(tokens[0]))
        times.append(time.perf_counter())

    if stream is not None:
        print(prompts[0], end="", flush=True)
    start = time.perf_counter()
    try:
        out = model.generate(
            ids,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_token_id=tok.eos_id,
            generator=gen,
            attention_mask=mask,
            streamer=on_tokens,
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    new_ids = out[:, width:]
    beyond = new_ids >= tok.vocab_size  # embedding rows past the tokenizer (a padded vocabulary)
    if stream is not None:
        stream.end()
    else:
        for i, (text, row) in enumerate(zip(prompts, new_ids)):
            if len(args.prompt) > 1:
                print(f"--- prompt {i // args.num_samples} sample {i % args.num_samples}")
            elif args.num_samples > 1:
                print(f"--- sample {i}")
            print(text + tok.decode(row[row < tok.vocab_size]))
    if bool(beyond.any()):
        print(
            f"{PROG} generate: note: dropped {int(beyond.sum())} sampled id(s) >= "
            f"{tok.vocab_size}, outside the tokenizer's vocabulary",
            file=sys.stderr,
        )
    if times:
        steps = len(times)
        ttft = times[0] - start
        rate = (steps - 1) / (times[-1] - times[0]) if steps > 1 and times[-1] > times[0] else None
        decode = f", then {rate:.1f} tokens/s" if rate is not None else ""
        batch = f" x {len(prompts)} rows" if len(prompts) > 1 else ""
        print(
            f"{PROG} generate: {width} prompt tokens{batch}; time to first token "
            f"{ttft * 1e3:.0f} ms{decode} ({steps} decoding steps in {times[-1] - start:.2f} s)",
            file=sys.stderr,
        )
    return 0
