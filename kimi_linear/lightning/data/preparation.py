"""``kimi-linear prepare``: tokenize local documents into a chunked token dataset.

One job: ``kimi-linear prepare`` (inputs -> parallel tokenisation -> shards, written atomically);
the readers are :mod:`.sources` / :mod:`.instruct`, the shard format :mod:`.shards`.

Inputs are text files, JSONL files (a text field per record), parquet files (a text column),
folders of those, or the name ``pydoc_data.topics`` (CPython's bundled help text).  Work units
(files, line-aligned ranges of big JSONL files, row groups of parquet files) are tokenised by
parallel worker processes, each document followed by the tokenizer's EOS, and written as shards
of the format in :mod:`~kimi_linear.lightning.data.shards`, with a progress bar and a summary
(documents, tokens, bytes, tokens/s, and everything skipped).

The dataset is written to a new folder beside ``--output_dir`` and renamed into place only when
it is complete, so a failed or interrupted ``prepare --overwrite`` leaves the previous dataset
as it was.

Documents are held out for validation by a hash of their text
(:func:`~kimi_linear.lightning.data.sources.is_held_out`), so the split does not depend on the
number of workers or the input order, and no document (nor a copy of it) is in both splits.
Input that is not text is skipped and counted (:mod:`~kimi_linear.lightning.data.sources`);
when nothing readable is left, or a split is empty, prepare stops with an error.

``--format`` reads instruction / chat records (``{"prompt", "completion"}``, Alpaca's
``{"instruction", "input", "output"}``, ``{"messages": [{"role", "content"}, ...]}``, or ``auto``
per record; :mod:`~kimi_linear.lightning.data.instruct`): each record is rendered (Alpaca's
prompt; the tokenizer's chat template or the built-in one), tokenised segment by segment, and
stored with a per-token loss mask (1 on the responses), so training scores only the responses.

``--train_bpe VOCAB`` first trains a byte-level BPE tokenizer (Hugging Face ``tokenizers``) on
the training documents only, saves it as ``DIR/tokenizer.json`` and tokenises with it, so a
corpus and its tokenizer can be made offline in one command.

Why this format rather than ``litdata.optimize``: litdata requires ``torchvision``, and with the
CPU build of torch the PyPI ``torchvision`` wheel fails to import (``operator torchvision::nms
does not exist``), while without a pinned torch pip replaces it with a CUDA build; a flat token
file per unit plus document offsets, read through ``numpy.memmap``, needs nothing beyond numpy
and keeps document boundaries exact for packing with state resets.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kimi_linear.errors import PROG as KIMI_LINEAR
from kimi_linear.errors import UsageError
from kimi_linear.lightning.data.instruct import (
    Example,
    check_record_format,
    encode_segments,
    make_renderer,
)
from kimi_linear.lightning.data.shards import (
    FORMAT,
    META,
    SPLITS,
    VERSION,
    token_dtype,
    write_shard,
)
from kimi_linear.lightning.data.sources import (
    MAX_INVALID_FRACTION,
    SourceCounts,
    Unit,
    document_key,
    is_held_out,
    iter_documents,
    list_units,
)
from kimi_linear.tokenizer import ByteTokenizer, load_tokenizer, train_byte_level_bpe

PROG = f"{KIMI_LINEAR} prepare"

# Per-process state of the workers (set by _init_worker).
_WORKER: dict[str, Any] = {}


def _init_worker(
    tokenizer_spec: Any,
    tokenizer_options: dict[str, Any],
    output_dir: str,
    text_field: str,
    val_fraction: float,
    max_invalid_fraction: float,
    record_format: str = "text",
    chat_template: str = "auto",
) -> None:
    tok = load_tokenizer(tokenizer_spec, **tokenizer_options)
    _WORKER.update(
        record_format=record_format,
        renderer=None if record_format == "text" else make_renderer(chat_template, tok),
    )
    _WORKER.update(
        tokenizer=tok,
        is_byte=isinstance(tok, ByteTokenizer),
        dtype=token_dtype(tok.vocab_size),
        output_dir=output_dir,
        text_field=text_field,
        val_fraction=val_fraction,
        max_invalid_fraction=max_invalid_fraction,
    )


def _encode(text: str) -> np.ndarray:
    tok, dtype = _WORKER["tokenizer"], _WORKER["dtype"]
    if _WORKER["is_byte"]:
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(dtype)
    else:
        ids = np.asarray(tok.encode(text), dtype=dtype)
    return np.append(ids, np.asarray(tok.eos_id, dtype=dtype))


def _encode_example(example: Example) -> tuple[np.ndarray, np.ndarray, int]:
    """Token ids, the uint8 loss mask and the rendered UTF-8 bytes of an instruction / chat /
    text example, rendered by the worker's chat renderer and tokenised segment by segment
    (ends with EOS)."""
    tok, dtype = _WORKER["tokenizer"], _WORKER["dtype"]
    segments = _WORKER["renderer"].render(example)
    ids, mask = encode_segments(segments, tok.encode, tok.eos_id)
    size = sum(len(t.encode("utf-8")) for t, _ in segments if t is not None)
    return np.asarray(ids, dtype=dtype), np.asarray(mask, dtype=np.uint8), size


def _process_unit(job: tuple[int, Unit]) -> dict[str, Any]:
    """Tokenise one work unit and write its shard of each split; returns its statistics."""
    index, unit = job
    counts = SourceCounts()
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    masks: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    keys: dict[str, list[int]] = {s: [] for s in SPLITS}
    record_format = _WORKER["record_format"]
    for doc in iter_documents(
        unit, counts, _WORKER["text_field"], _WORKER["max_invalid_fraction"], record_format
    ):
        key = document_key(doc.key_text if isinstance(doc, Example) else doc)
        split = "val" if key < _WORKER["val_fraction"] * 2**64 else "train"  # is_held_out
        if isinstance(doc, Example):
            ids, mask, size = _encode_example(doc)
            counts.bytes += size - doc.num_bytes  # the rendered text (template included)
            parts[split].append(ids)
            masks[split].append(mask)
        else:
            parts[split].append(_encode(doc))
        keys[split].append(key)
    shards: dict[str, dict[str, Any]] = {}
    for split, arrays in parts.items():
        if not arrays:
            continue
        ends = np.cumsum([len(a) for a in arrays], dtype=np.int64)
        loss_mask = np.concatenate(masks[split]) if record_format != "text" else None
        shards[split] = write_shard(
            _WORKER["output_dir"], split, index, np.concatenate(arrays), ends, loss_mask
        )
        # order-sensitive checksum pieces of the unit's documents (see _checksum)
        shards[split]["key_sum"] = sum(keys[split]) % 2**64
        shards[split]["key_moment"] = sum(i * k for i, k in enumerate(keys[split])) % 2**64
    return {"index": index, "size": unit.size, "shards": shards, "counts": counts.as_dict()}


def _checksum(shards: list[dict[str, Any]]) -> str:
    """``sum_j (j + 1) * key_j mod 2**64`` over a split's documents ``j`` in order (keys from
    :func:`~kimi_linear.lightning.data.sources.document_key`), combined from the per-shard sums,
    so it depends on the documents and their order but not on how they were cut into units."""
    total, offset = 0, 0
    for sh in shards:
        total += (offset + 1) * sh.pop("key_sum") + sh.pop("key_moment")
        offset += sh["num_documents"]
    return f"{total % 2**64:016x}"


def _check_output(output_dir: Path, overwrite: bool) -> None:
    """Refuse an ``--output_dir`` that is a file, or a non-empty folder unless ``overwrite`` and
    it holds a prepared dataset (nothing is deleted here: see :func:`_replace_output`)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir: {os.fspath(output_dir)!r} is a file")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        ours = (output_dir / META).is_file() or any((output_dir / s).is_dir() for s in SPLITS)
        if not overwrite:
            raise UsageError(
                f"--output_dir: {os.fspath(output_dir)!r} is not empty; pass --overwrite to "
                "replace a prepared dataset"
            )
        if not ours:
            raise UsageError(
                f"--output_dir: {os.fspath(output_dir)!r} is not empty and holds no prepared "
                "dataset; refusing to overwrite it"
            )


def _staging_dir(output_dir: Path) -> Path:
    """A new empty folder beside ``output_dir`` (same filesystem, so the final swap is a rename)
    where the dataset is written before it replaces ``output_dir``."""
    parent = output_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    while True:  # mkdir (not mkdtemp): the folder gets the usual mode (umask), not 0700
        path = parent / f".{output_dir.name}.prepare-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _replace_output(staging: Path, output_dir: Path) -> None:
    """Move the finished dataset in ``staging`` to ``output_dir``.  An existing ``output_dir``
    (checked by :func:`_check_output`) is renamed aside first and deleted only once the new one
    is in place; if the rename fails it is put back, so the old dataset is never lost."""
    if not output_dir.exists():
        staging.rename(output_dir)
        return
    old = output_dir.parent / f".{output_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    output_dir.rename(old)
    try:
        staging.rename(output_dir)
    except BaseException:
        old.rename(output_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def train_bpe(
    units: Sequence[Unit],
    vocab_size: int,
    output: Path,
    text_field: str = "text",
    val_fraction: float = 0.01,
    max_invalid_fraction: float = MAX_INVALID_FRACTION,
    record_format: str = "text",
) -> Path:
    """Train a byte-level BPE tokenizer (:func:`~kimi_linear.tokenizer.train_byte_level_bpe`)
    with ``<|endoftext|>`` as its EOS on the *training* documents of ``units`` and save it to
    ``output`` (a ``tokenizer.json``).  Instruction / chat records train it on their text as
    rendered with the built-in template."""
    if vocab_size < 257:  # before reading any document
        raise UsageError(f"--train_bpe must be >= 257 (256 bytes + EOS), got {vocab_size}")

    renderer = make_renderer("builtin")

    def train_docs() -> Iterator[str]:
        for unit in units:
            docs = iter_documents(
                unit, SourceCounts(), text_field, max_invalid_fraction, record_format
            )
            for doc in docs:
                if isinstance(doc, Example):
                    if not is_held_out(doc.key_text, val_fraction):
                        yield "".join(t for t, _ in renderer.render(doc) if t is not None)
                elif not is_held_out(doc, val_fraction):
                    yield doc

    return train_byte_level_bpe(train_docs(), vocab_size, output)


def prepare(
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | dict[str, Any] | None = "byte",
    tokenizer_options: dict[str, Any] | None = None,
    *,
    train_bpe_vocab: int | None = None,
    text_field: str = "text",
    val_fraction: float = 0.01,
    num_workers: int | None = None,
    extensions: Sequence[str] | None = None,
    max_invalid_fraction: float = MAX_INVALID_FRACTION,
    chunk_bytes: int = 64 << 20,
    overwrite: bool = False,
    progress: bool = True,
    record_format: str = "text",
    chat_template: str = "auto",
) -> dict[str, Any]:
    """Tokenise ``inputs`` into a prepared dataset at ``output_dir``; returns the summary
    (also stored in ``meta.json``).  See the module docstring; arguments mirror
    ``kimi-linear prepare --help`` (``record_format`` is ``--format``)."""
    if not 0 < val_fraction < 1:
        raise UsageError(f"--val_fraction must be in (0, 1), got {val_fraction}")
    if not 0 <= max_invalid_fraction < 1:
        raise UsageError(f"--max_invalid_fraction must be in [0, 1), got {max_invalid_fraction}")
    if num_workers is not None and num_workers < 0:
        raise UsageError(f"--num_workers must be >= 0, got {num_workers}")
    if not text_field:
        raise UsageError("--text_field must be a non-empty field name")
    check_record_format(record_format, chat_template)
    if train_bpe_vocab is not None and chat_template == "tokenizer":
        raise UsageError("--chat_template tokenizer: a --train_bpe tokenizer has no chat template")
    tokenizer_options = dict(tokenizer_options or {})
    if train_bpe_vocab is not None and tokenizer not in (None, "byte"):
        raise UsageError("--train_bpe trains the tokenizer: do not also give --tokenizer")
    units, ignored = list_units(inputs, extensions, chunk_bytes)
    cpus = os.cpu_count() or 1
    wanted = cpus if num_workers is None else max(num_workers, 1)
    if wanted > 1:  # cut big files finer so that every worker gets several units
        finer = max(1 << 20, sum(u.size for u in units) // (4 * wanted))
        if finer < chunk_bytes:
            units, ignored = list_units(inputs, extensions, finer)
    final = Path(output_dir)
    if final.is_symlink():  # replace the folder the link points to, keep the link
        final = final.resolve()
    if train_bpe_vocab is None:
        tok = load_tokenizer(tokenizer, **tokenizer_options)  # fail early on a bad tokenizer
        if record_format != "text":
            make_renderer(chat_template, tok)  # fail early on a missing chat template
    _check_output(final, overwrite)
    out = _staging_dir(final)  # written here, moved to ``final`` only when complete
    try:
        summary = _prepare_into(
            out, final, inputs, units, ignored, tokenizer, tokenizer_options,
            None if train_bpe_vocab is not None else tok, train_bpe_vocab, text_field,
            val_fraction, num_workers, wanted, max_invalid_fraction, progress, record_format,
            chat_template,
        )  # fmt: skip
        _replace_output(out, final)
    finally:
        if out.exists():  # failed or interrupted: the old dataset (if any) is untouched
            shutil.rmtree(out, ignore_errors=True)
    return summary


def _prepare_into(
    out: Path,
    final: Path,
    inputs: Sequence[str | os.PathLike],
    units: list[Unit],
    ignored: list[str],
    tokenizer: Any,
    tokenizer_options: dict[str, Any],
    tok: Any,
    train_bpe_vocab: int | None,
    text_field: str,
    val_fraction: float,
    num_workers: int | None,
    wanted: int,
    max_invalid_fraction: float,
    progress: bool,
    record_format: str = "text",
    chat_template: str = "auto",
) -> dict[str, Any]:
    """The body of :func:`prepare`: write the dataset into the staging folder ``out`` (which
    becomes ``final``); returns the summary."""
    if train_bpe_vocab is not None:
        path = train_bpe(
            units, train_bpe_vocab, out / "tokenizer.json", text_field, val_fraction,
            max_invalid_fraction, record_format,
        )  # fmt: skip
        tokenizer, tokenizer_options = os.fspath(path), {"eos_token": "<|endoftext|>"}
        tok = load_tokenizer(tokenizer, **tokenizer_options)
    started = time.perf_counter()  # tokenising and writing (after any BPE training)
    init = (tokenizer, tokenizer_options, os.fspath(out), text_field, val_fraction,
            max_invalid_fraction, record_format, chat_template)  # fmt: skip
    workers = 0 if num_workers == 0 else min(wanted, len(units))  # 0 or 1: in this process
    results: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=sum(u.size for u in units), unit="B", unit_scale=True, desc="prepare",
            file=sys.stderr,
        )  # fmt: skip
    jobs = list(enumerate(units))
    try:
        if workers <= 1:
            _init_worker(*init)
            stream: Any = map(_process_unit, jobs)
            pool = None
        else:
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else "spawn")
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=init)
            stream = pool.imap(_process_unit, jobs)
        tokens_so_far = 0
        for r in stream:
            results.append(r)
            tokens_so_far += sum(sh["num_tokens"] for sh in r["shards"].values())
            if bar is not None:
                bar.update(r["size"])
                bar.set_postfix(tokens=tokens_so_far)
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    counts = SourceCounts()
    for r in results:
        counts.add(SourceCounts(**r["counts"]))
    if counts.documents == 0:
        raise UsageError(
            f"--input: no text documents found ({counts.skipped_binary} not text, "
            f"{counts.skipped_empty} empty, {counts.skipped_bad_json} bad JSON lines, "
            f"{counts.skipped_no_text} records without a string {text_field!r}, "
            f"{counts.skipped_bad_record} records not in --format {record_format})"
        )
    splits: dict[str, Any] = {}
    for split in SPLITS:
        shards = [r["shards"][split] for r in results if split in r["shards"]]
        splits[split] = {
            "num_documents": sum(s["num_documents"] for s in shards),
            "num_tokens": sum(s["num_tokens"] for s in shards),
            "checksum": _checksum(shards),
            "shards": shards,
        }
        if record_format != "text":
            splits[split]["num_loss_tokens"] = sum(s["num_loss_tokens"] for s in shards)
    for split in SPLITS:
        if splits[split]["num_documents"] == 0:
            raise UsageError(
                f"the {split} split is empty: {counts.documents} document(s) with "
                f"--val_fraction {val_fraction}; "
                + ("raise --val_fraction" if split == "val" else "lower --val_fraction")
                + " or add documents"
            )
    tokens = splits["train"]["num_tokens"] + splits["val"]["num_tokens"]
    summary = {
        "documents": counts.documents,
        "train_documents": splits["train"]["num_documents"],
        "val_documents": splits["val"]["num_documents"],
        "tokens": tokens,
        "train_tokens": splits["train"]["num_tokens"],
        "val_tokens": splits["val"]["num_tokens"],
        "bytes": counts.bytes,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / max(seconds, 1e-9)),
        "workers": max(workers, 1),
        "units": len(units),
        "skipped_not_text": counts.skipped_binary,
        "skipped_empty": counts.skipped_empty,
        "skipped_bad_json": counts.skipped_bad_json,
        "skipped_no_text_field": counts.skipped_no_text,
        "ignored_files": len(ignored),
    }
    if record_format != "text":
        summary["skipped_bad_record"] = counts.skipped_bad_record
        summary["train_loss_tokens"] = splits["train"]["num_loss_tokens"]
        summary["val_loss_tokens"] = splits["val"]["num_loss_tokens"]
    spec = dict(tok.spec)
    if "path" in spec and Path(spec["path"]).parent in (out.resolve(), final.resolve()):
        spec["path"] = Path(spec["path"]).name  # a tokenizer inside the dataset moves with it
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": spec,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": token_dtype(tok.vocab_size).str,
        "val_fraction": val_fraction,
        "text_field": text_field,
        "records": None
        if record_format == "text"
        else {"format": record_format, "chat_template": make_renderer(chat_template, tok).template},
        "inputs": [os.fspath(i) for i in inputs],
        "splits": splits,
        "summary": summary,
    }
    tmp = out / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(out / META)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a few human-readable lines."""
    s = summary
    lines = [
        f"documents: {s['documents']:,} (train {s['train_documents']:,}, val {s['val_documents']:,})",
        f"tokens:    {s['tokens']:,} (train {s['train_tokens']:,}, val {s['val_tokens']:,})",
        f"bytes:     {s['bytes']:,} of text ({s['bytes'] / max(s['tokens'], 1):.2f} bytes/token)",
        f"time:      {s['seconds']:.2f} s, {s['tokens_per_second']:,} tokens/s "
        f"({s['workers']} worker(s), {s['units']} unit(s))",
    ]
    if "train_loss_tokens" in s:  # instruction / chat data
        loss = f"train {s['train_loss_tokens']:,}, val {s['val_loss_tokens']:,}"
        lines.insert(2, f"in loss:   {loss} tokens (the responses; prompts masked)")
    skipped = {
        k: v for k, v in s.items() if (k.startswith("skipped_") or k == "ignored_files") and v
    }
    if skipped:
        lines.append("skipped:   " + ", ".join(f"{k}={v:,}" for k, v in skipped.items()))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Tokenize local text / JSONL / parquet files or folders into a chunked token "
        "dataset for `kimi-linear fit` (data: TokenDataModule).  Nothing is downloaded.",
    )
    p.add_argument(
        "--input", nargs="+", required=True,
        help="files or folders (recursive); .jsonl/.ndjson: one JSON object per line with a text "
        "field; .parquet: a text column; anything else: one document per file; the name "
        "'pydoc_data.topics' reads CPython's bundled help text",
    )  # fmt: skip
    p.add_argument("--output_dir", required=True, help="folder to write (must be empty)")
    p.add_argument(
        "--tokenizer", default="byte",
        help="'byte' (default), a tokenizer.json, a Hugging Face tokenizer folder, or a tiktoken "
        "BPE file ('<base64 token> <rank>' lines, e.g. Kimi's tiktoken.model)",
    )  # fmt: skip
    p.add_argument("--train_bpe", type=int, default=None, metavar="VOCAB",
                   help="train a byte-level BPE of this vocabulary size on the training "
                   "documents, save it as OUTPUT_DIR/tokenizer.json and use it")  # fmt: skip
    p.add_argument("--eos_token", default=None, help="end-of-document token of the tokenizer")
    p.add_argument("--bos_token", default=None, help="beginning-of-document token (optional)")
    p.add_argument("--tiktoken_pattern", default=None,
                   help="tiktoken files: the pre-tokenisation regex, or 'gpt2'")  # fmt: skip
    p.add_argument("--special_tokens", default=None,
                   help="tiktoken files: a JSON object {token: id} or a comma-separated list "
                   "numbered after the ranks (default: the EOS token)")  # fmt: skip
    p.add_argument("--trust_remote_code", action="store_true",
                   help="tokenizer folders: allow a tokenizer class shipped in the folder")  # fmt: skip
    p.add_argument("--text_field", default="text", help="JSONL field / parquet column (text)")
    p.add_argument(
        "--format", default="text", dest="record_format",
        choices=["text", "auto", "prompt_completion", "alpaca", "chat"],
        help="JSONL / parquet records: 'text' (the --text_field, all tokens in the loss; "
        "default), 'prompt_completion' ({prompt, completion}), 'alpaca' ({instruction, input, "
        "output}), 'chat' ({messages: [{role, content}, ...]}) or 'auto' (by each record's "
        "keys); instruction forms keep only the responses in the loss",
    )  # fmt: skip
    p.add_argument(
        "--chat_template", default="auto", choices=["auto", "builtin", "tokenizer"],
        help="chat records: the tokenizer's chat template ('tokenizer'), the built-in "
        "<|user|> / <|assistant|> template ('builtin'), or the tokenizer's when it has one "
        "('auto', default)",
    )  # fmt: skip
    p.add_argument("--val_fraction", type=float, default=0.01,
                   help="share of the documents held out for validation (0.01)")  # fmt: skip
    p.add_argument("--num_workers", type=int, default=None,
                   help="worker processes (default: CPU count, at most one per unit)")  # fmt: skip
    p.add_argument("--extensions", nargs="+", default=None,
                   help="suffixes read from folders (default: .txt .md .rst .py .jsonl .ndjson "
                   ".parquet)")  # fmt: skip
    p.add_argument("--max_invalid_fraction", type=float, default=MAX_INVALID_FRACTION,
                   help="skip a document whose bytes are more than this share invalid UTF-8 "
                   f"({MAX_INVALID_FRACTION})")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace a prepared dataset")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def _tokenizer_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if args.eos_token is not None:
        options["eos_token"] = args.eos_token
    if args.bos_token is not None:
        options["bos_token"] = args.bos_token
    if args.tiktoken_pattern is not None:
        options["pattern"] = args.tiktoken_pattern
    if args.special_tokens is not None:
        text = args.special_tokens.strip()
        if text.startswith("{"):
            try:
                options["special_tokens"] = {str(k): int(v) for k, v in json.loads(text).items()}
            except (json.JSONDecodeError, TypeError, ValueError) as e:
                raise UsageError(f"--special_tokens: not a JSON object of token ids ({e})") from e
        else:
            options["special_tokens"] = [t.strip() for t in text.split(",") if t.strip()]
    if args.trust_remote_code:
        options["trust_remote_code"] = True
    return options


def prepare_main(argv: list[str]) -> int:
    """``kimi-linear prepare``: tokenise ``--input`` into ``--output_dir``; prints the summary."""
    args = _parser().parse_args(argv)
    summary = prepare(
        args.input,
        args.output_dir,
        args.tokenizer,
        _tokenizer_options(args),
        train_bpe_vocab=args.train_bpe,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        num_workers=args.num_workers,
        extensions=args.extensions,
        max_invalid_fraction=args.max_invalid_fraction,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        record_format=args.record_format,
        chat_template=args.chat_template,
    )
    print(f"prepared {args.output_dir}")
    print(format_summary(summary))
    return 0


__all__ = ["format_summary", "prepare", "prepare_main", "train_bpe"]
