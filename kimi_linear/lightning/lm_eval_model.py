"""lm-evaluation-harness's model interface implemented on :class:`KimiLinearForCausalLM`.

:class:`KimiLinearLM` is an ``lm_eval.api.model.TemplateLM`` registered with lm-eval as
``kimi-linear``, so once this module is imported every lm-eval task runs on the kit's own model
and tokenizer (a Lightning checkpoint, a sharded checkpoint folder, an exported / released /
transformers-saved folder, or a model object)::

    import lm_eval
    import kimi_linear.lightning.lm_eval_model  # registers "kimi-linear"

    lm_eval.simple_evaluate(model="kimi-linear", model_args="pretrained=runs/.../last.ckpt",
                            tasks=["lambada_openai"])

It scores requests the way lm-eval's ``hf`` model does, so the numbers agree with
``lm_eval --model hf`` on the exported folder (``tests/test_evaluate.py``): the same request
order and left truncation to ``max_length``, the same rolling windows for perplexity, the
loglikelihood prefix token (``<bos>``, else ``<eos>``) and stop-sequence handling.  Batches are
right-padded for scoring (the model is causal: pads after a row's tokens cannot change its
logits) and left-padded with an attention mask for generation (pads never reach the KDA state or
the MLA cache).

This module imports ``lm_eval`` at the top; :mod:`kimi_linear.lightning.evaluate` checks that it
is installed first and says how to install it.

Shapes: ``B`` batch rows, ``T`` tokens per row, ``V`` vocabulary size.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from kimi_linear.errors import UsageError
from kimi_linear.model import cast_model_, sample_next_token

#: ``dtype=`` values accepted in ``model_args`` (and ``kimi-linear evaluate --dtype``).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``None`` (keep the checkpoint's), a ``torch.dtype`` or one of :data:`DTYPES` (``fp32``,
    ``bf16`` and ``fp16`` too); anything else is a :class:`UsageError`."""
    if value is None or isinstance(value, torch.dtype):
        return value
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "auto": None}
    name = aliases.get(str(value), str(value))
    if name is None:
        return None
    if name not in DTYPES:
        raise UsageError(f"dtype: expected one of {sorted(DTYPES)} or auto, got {value!r}")
    return DTYPES[name]


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1 or str(number) != str(value).strip():
        raise UsageError(f"{name} must be an int >= 1, got {value!r}")
    return number


@register_model("kimi-linear", "kimi_linear")
class KimiLinearLM(TemplateLM):
    """A kit model as an lm-eval ``LM``: ``loglikelihood``, ``loglikelihood_rolling`` and
    ``generate_until``, batched.

    Args:
        pretrained: a :class:`KimiLinearForCausalLM` (or a module with its interface: ``config``,
            ``model`` (the backbone, hidden states ``[B, T, D]``), ``lm_head``, ``new_cache`` and
            a cached forward), or a path :func:`load_model` reads (a Lightning ``.ckpt``, a
            sharded checkpoint folder, an exported / released folder).
        tokenizer: a tokenizer object (:mod:`kimi_linear.tokenizer`), a
            ``--tokenizer`` string (``byte``, a ``tokenizer.json``, a folder, a JSON spec), or
            ``None``: the one recorded in the checkpoint, the folder's files, else bytes
            (:func:`~kimi_linear.lightning.load.resolve_tokenizer`).
        batch_size: requests per forward pass.
        device: ``cpu``, ``cuda``, ``cuda:1``, ...
        dtype: cast the weights (``float32`` / ``bfloat16`` / ``float16``); default: as stored.
        max_length: the longest input in tokens (default and upper bound: the model's
            ``max_position_embeddings``); longer requests are cut from the left, as lm-eval's
            ``hf`` model does.
        max_gen_toks: default number of generated tokens when a task sets none.
        add_bos_token: prepend ``<bos>`` to every encoded string (off, as ``hf``).
        seed: seed of the sampling generator (tasks with ``do_sample: true``).
    """

    def __init__(
        self,
        pretrained: str | os.PathLike | torch.nn.Module,
        tokenizer: Any = None,
        batch_size: int | str = 8,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        add_bos_token: bool | str = False,
        seed: int | str = 0,
        **unused: Any,
    ) -> None:
        super().__init__()
        if unused:
            raise UsageError(
                f"kimi-linear model_args: unknown argument(s) {sorted(unused)}; known: pretrained, "
                "tokenizer, batch_size, device, dtype, max_length, max_gen_toks, add_bos_token, seed"
            )
        if str(batch_size).startswith("auto"):
            raise UsageError("batch_size: give a number (automatic batch sizes are not supported)")
        self._batch_size = _positive_int("batch_size", batch_size)
        self._max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.add_bos_token = str(add_bos_token).lower() in ("1", "true", "yes")
        target = parse_dtype(dtype)
        if isinstance(pretrained, torch.nn.Module):
            model, source = pretrained.to(device), None
        else:
            from kimi_linear.lightning.load import load_model

            model, source = load_model(pretrained, device), os.fspath(pretrained)
        if target is not None and target != next(model.parameters()).dtype:
            cast_model_(model, target)
        self.model = model.eval()
        self._device = next(model.parameters()).device
        vocab = model.config.vocab_size
        if tokenizer is None or isinstance(tokenizer, str):
            if source is None and tokenizer is None:
                raise UsageError("tokenizer: required when the model is given as an object")
            from kimi_linear.lightning.load import resolve_tokenizer

            tokenizer = resolve_tokenizer(tokenizer, source or "", vocab)
        self.tokenizer = tokenizer
        if getattr(tokenizer, "eos_id", None) is None:
            raise UsageError(f"tokenizer: {tokenizer!r} has no end-of-text (eos) token")
        limit = model.config.max_position_embeddings
        self._max_length = limit if max_length is None else _positive_int("max_length", max_length)
        if self._max_length > limit:
            raise UsageError(
                f"max_length={self._max_length} is above the model's limit "
                f"(max_position_embeddings={limit})"
            )
        self._generator = torch.Generator(device=self._device).manual_seed(int(seed))
        self.truncated = 0  # requests cut from the left to fit max_length (reported once)

    # ------------------------------------------------------------------------- properties
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_id)

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: ``<bos>``, else ``<eos>`` (as ``hf``)."""
        bos = getattr(self.tokenizer, "bos_id", None)
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return repr(self.tokenizer).replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        add = self.add_bos_token if add_special_tokens is None else bool(add_special_tokens)
        return self.tokenizer.encode(string, add_bos=add and self.tokenizer.bos_id is not None)

    def tok_decode(self, tokens: list[int]) -> str:
        vocab = getattr(self.tokenizer, "vocab_size", None)
        return self.tokenizer.decode([t for t in tokens if vocab is None or t < vocab])

    # ------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def _last_logprobs(self, rows: list[list[int]], counts: list[int]) -> list[torch.Tensor]:
        """Log-softmax (fp32) of the last ``counts[i]`` positions of each of ``rows`` (at most
        ``max_length`` tokens each): ``[counts[i], V]`` per row.

        The rows are right-padded into one ``[B, T]`` batch for the backbone; the LM head runs
        only on the positions asked for, so a large vocabulary costs ``sum(counts) x V``, not
        ``B x T x V``.
        """
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        hidden = self.model.model(ids.to(self._device))  # [B, T, D]
        picked = torch.cat(
            [hidden[i, len(r) - c : len(r)] for i, (r, c) in enumerate(zip(rows, counts))]
        )
        logprobs = F.log_softmax(self.model.lm_head(picked).float(), dim=-1)
        return list(logprobs.split(counts))

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation | context), greedy == continuation)`` per request of
        ``(key, context ids, continuation ids)``; longest first, in batches of ``batch_size``."""

        def longest_first(req):  # as hf: time estimates are upper bounds, OOM shows up first
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        order = Collator(
            requests,
            sort_fn=longest_first,
            group_by="contexts",  # one forward for the choices that differ in the last token
            group_fn=lambda req: req[-2] + req[-1][:-1],
        )
        out: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood requests")
        for chunk in order.get_batched(n=self.batch_size):
            rows, lengths = [], []
            for _, context, continuation in chunk:
                if not context or not continuation:
                    raise ValueError("loglikelihood requests need context and continuation tokens")
                if len(context) + len(continuation) > self.max_length + 1:
                    self.truncated += 1
                row = (context + continuation)[-(self.max_length + 1) :][:-1]
                rows.append(row)
                lengths.append(len(row))
            counts = [min(len(cont), n) for (_, _, cont), n in zip(chunk, lengths)]
            logprobs = self._last_logprobs(rows, counts)
            for (key, context, continuation), cont_lp in zip(chunk, logprobs):
                cont_lp = cont_lp.unsqueeze(0)  # [1, C, V]
                greedy = cont_lp.argmax(dim=-1)
                for key_i, cont_i, lp_i in order.get_cache(
                    req_str=key, cxt_toks=context, cont_toks=continuation, logits=cont_lp
                ):
                    target = torch.tensor(cont_i, dtype=torch.long, device=lp_i.device)[None]
                    is_greedy = bool((greedy[:, -target.shape[1] :] == target).all())
                    picked = lp_i[:, -target.shape[1] :].gather(2, target[..., None])
                    answer = (float(picked.sum()), is_greedy)
                    out.append(answer)
                    if key_i is not None:
                        self.cache_hook.add_partial("loglikelihood", key_i, answer)
                    bar.update(1)
        bar.close()
        return order.get_original(out)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string (perplexity tasks): disjoint windows of at most
        ``max_length`` tokens, each after as much context as fits (lm-eval's rolling windows)."""
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, target in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, target))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------------- generation
    @torch.no_grad()
    def _generate(
        self,
        rows: list[list[int]],
        max_new_tokens: int,
        stop: list[str],
        temperature: float,
        top_k: int | None,
        top_p: float | None,
    ) -> list[list[int]]:
        """New token ids for each prompt of ``rows`` (left-padded into one batch): decoding
        ends for a row at ``<eos>`` or once its text contains a stop sequence."""
        width = max(len(r) for r in rows)
        pad = 0
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self._device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        mask = mask.to(self._device)
        model = self.model
        cache = model.new_cache(len(rows), capacity=width + max_new_tokens)
        logits = model(ids, cache=cache, logits_to_keep=1, attention_mask=mask)[:, -1]
        new: list[list[int]] = [[] for _ in rows]
        active = list(range(len(rows)))
        stops = [s for s in stop if s]
        for step in range(max_new_tokens):
            token = sample_next_token(logits, temperature, top_k, top_p, self._generator)
            keep = []
            for j, (row, t) in enumerate(zip(active, token.tolist())):
                if t == self.eot_token_id:
                    continue
                new[row].append(t)
                if stops and any(s in self.tok_decode(new[row]) for s in stops):
                    continue
                keep.append(j)
            if step == max_new_tokens - 1 or not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=self._device)
                cache.index_select(index)
                token = token[index]
                active = [active[j] for j in keep]
            logits = model(token[:, None], cache=cache, logits_to_keep=1)[:, -1]
        return new

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context until a stop sequence, ``<eos>`` or ``max_gen_toks``
        tokens (greedy unless the task sets ``do_sample``); the stop sequence is cut off."""

        def longest_first(req):
            return -len(self.tok_encode(req[0])), req[0]

        order = Collator(
            [req.args for req in requests],
            sort_fn=longest_first,
            group_by="gen_kwargs",
            group_fn=lambda req: req[1],
        )
        out: list[str] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until requests")
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise UsageError(
                    f"max_gen_toks={max_new} leaves no room for a prompt within "
                    f"max_length={self.max_length}"
                )
            sample = bool(kwargs.get("do_sample"))
            temperature = float(kwargs.get("temperature", 0.0)) if sample else 0.0
            top_k = kwargs.get("top_k") if sample else None
            top_p = kwargs.get("top_p") if sample else None
            rows = []
            for context in contexts:
                row = self.tok_encode(context)
                if len(row) > self.max_length - max_new:
                    self.truncated += 1
                    row = row[-(self.max_length - max_new) :]
                if not row:  # an empty prompt starts from the prefix token
                    row = [self.prefix_token_id]
                rows.append(row)
            for context, gen_kwargs, new in zip(
                contexts,
                all_kwargs,
                self._generate(rows, max_new, until, temperature, top_k, top_p),
            ):
                text = postprocess_generated_text(self.tok_decode(new), until, None)
                out.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(1)
        bar.close()
        return order.get_original(out)

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records about the model in the results."""
        config = self.model.config
        return {
            "model_name": getattr(config, "name", type(self.model).__name__),
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "layer_kinds": "".join("K" if k == "kda" else "M" for k in config.layer_kinds),
            "max_length": self.max_length,
            "tokenizer": repr(self.tokenizer),
        }


__all__ = ["DTYPES", "KimiLinearLM", "parse_dtype"]
