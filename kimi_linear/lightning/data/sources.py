"""Reading local documents: text files, JSONL (a text field) and parquet, split into work units.

A *document* is one text file, one JSONL record or one parquet row.  Input that is not text is
never trained on: a file or record with a NUL byte, or with more than ``max_invalid_fraction`` of
its bytes not valid UTF-8, is skipped and counted (:class:`SourceCounts`), and the callers refuse
to go on when nothing readable is left.

JSONL files may start with a UTF-8 byte-order mark and use LF, CRLF or CR line endings.  A file
given twice (by name, or also through a folder) is read once, with a warning.

Large JSONL files are cut into line-aligned byte ranges and parquet files into row groups
(:func:`list_units`), so several worker processes can read one big file; the documents of the
units, in unit order, are the same whatever the number of workers.

Instruction and chat records (``record_format`` other than ``"text"``) are parsed by
:mod:`~kimi_linear.lightning.data.instruct` and yielded as its ``Example`` objects.

This module imports neither torch nor Lightning (it runs in ``kimi-linear prepare``'s workers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from kimi_linear.errors import UsageError
from kimi_linear.lightning.data.instruct import Example, parse_record

TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".py")
JSONL_EXTENSIONS = (".jsonl", ".ndjson")
PARQUET_EXTENSIONS = (".parquet",)
#: default share of a document's bytes that may be invalid UTF-8 (replaced) before it is skipped
MAX_INVALID_FRACTION = 0.001
_REPLACEMENT = "\ufffd".encode()
_BOM = "\ufeff"  # a UTF-8 byte-order mark (EF BB BF) decodes to this; never document content


#: the input name that reads CPython's bundled help topics (``pydoc_data.topics``), no file needed
BUILTIN_CORPUS = "pydoc_data.topics"


def document_key(text: str) -> int:
    """A stable 64-bit key of a document's text (blake2b) that decides held-out documents.

    Equal texts get equal keys, so a document repeated in the corpus is never in both splits.
    """
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def is_held_out(text: str, val_fraction: float) -> bool:
    """Whether ``text`` belongs to the validation split of a prepared dataset: its
    :func:`document_key` falls in the lowest ``val_fraction`` of the key range."""
    return document_key(text) < val_fraction * 2**64


def decode_text(raw: bytes, max_invalid_fraction: float = MAX_INVALID_FRACTION) -> str | None:
    """``raw`` as text, or ``None`` when it is not text.

    Not text: a NUL byte anywhere, or more than ``max_invalid_fraction`` of the bytes in
    invalid UTF-8 sequences.  Below that share, invalid sequences become U+FFFD.
    """
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    text = raw.decode("utf-8", errors="replace")
    invalid = text.count("\ufffd") - raw.count(_REPLACEMENT)
    if invalid > max_invalid_fraction * len(raw):
        return None
    return text


@dataclass
class SourceCounts:
    """What reading the inputs found (added up over work units)."""

    documents: int = 0
    bytes: int = 0
    skipped_binary: int = 0  #: files / records that are not text (NUL bytes or invalid UTF-8)
    skipped_empty: int = 0  #: empty documents
    skipped_bad_json: int = 0  #: JSONL lines that are not a JSON object
    skipped_no_text: int = 0  #: records whose text field is missing or not a string
    #: instruction / chat records that do not fit ``--format`` (a field missing or not a
    #: string, an unknown role, no non-empty response), and text files under an instruction
    #: format other than ``auto``
    skipped_bad_record: int = 0

    def add(self, other: SourceCounts) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def skipped(self) -> int:
        return (
            self.skipped_binary
            + self.skipped_empty
            + self.skipped_bad_json
            + self.skipped_no_text
            + self.skipped_bad_record
        )

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Unit:
    """A piece of work: a whole text file, a byte range of a JSONL file (the lines that start in
    ``[start, stop)``) or a range of row groups ``[start, stop)`` of a parquet file."""

    path: str
    kind: str  # "text" | "jsonl" | "parquet" | "builtin"
    start: int = 0
    stop: int = -1
    size: int = 0  #: input bytes, for the progress bar


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in JSONL_EXTENSIONS:
        return "jsonl"
    if suffix in PARQUET_EXTENSIONS:
        return "parquet"
    return "text"


def list_units(
    inputs: Sequence[str | os.PathLike],
    extensions: Sequence[str] | None = None,
    chunk_bytes: int = 64 << 20,
) -> tuple[list[Unit], list[str]]:
    """Work units of ``inputs`` (files or folders, read recursively in sorted order) and the files
    of those folders that were ignored for their suffix.  The name :data:`BUILTIN_CORPUS`
    (``pydoc_data.topics``) stands for CPython's bundled help topics, one document each.

    A file named explicitly is read whatever its suffix (``.jsonl`` / ``.ndjson`` as JSONL,
    ``.parquet`` as parquet, anything else as one text document); in a folder, only files whose
    suffix is in ``extensions`` (default: text, JSONL and parquet suffixes).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise UsageError("--input: give at least one file or folder")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    exts = {
        e.lower()
        for e in (extensions or (*TEXT_EXTENSIONS, *JSONL_EXTENSIONS, *PARQUET_EXTENSIONS))
    }
    files: list[Path] = []
    ignored: list[str] = []
    units: list[Unit] = []
    builtin = False
    for item in inputs:
        p = Path(item)
        if os.fspath(item) == BUILTIN_CORPUS and not p.exists():
            if builtin:
                warnings.warn(
                    f"--input: {BUILTIN_CORPUS} is given more than once; it is read once",
                    stacklevel=2,
                )
                continue
            builtin = True
            from pydoc_data.topics import topics

            size = sum(len(v.encode("utf-8")) for v in topics.values())
            units.append(Unit(BUILTIN_CORPUS, "builtin", 0, len(topics), size))
            continue
        if not p.exists():
            raise UsageError(f"--input: {os.fspath(item)!r} does not exist")
        if p.is_file():
            files.append(p)
            continue
        found = False
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            if f.suffix.lower() in exts:
                files.append(f)
                found = True
            else:
                ignored.append(os.fspath(f))
        if not found:
            raise UsageError(
                f"--input: folder {os.fspath(item)!r} has no files with suffix in {sorted(exts)}"
            )
    files = _unique_files(files)
    for f in files:
        kind, size = _kind(f), f.stat().st_size
        if kind == "jsonl" and size > chunk_bytes:
            for start in range(0, size, chunk_bytes):
                stop = min(size, start + chunk_bytes)
                units.append(Unit(os.fspath(f), kind, start, stop, stop - start))
        elif kind == "parquet":
            groups = _parquet_row_groups(f)
            step = max(1, round(groups * chunk_bytes / max(size, 1)))
            for start in range(0, max(groups, 1), step):
                stop = min(groups, start + step)
                units.append(
                    Unit(os.fspath(f), kind, start, stop, size * (stop - start) // max(groups, 1))
                )
        else:
            units.append(Unit(os.fspath(f), kind, 0, -1, size))
    return units, ignored


def _unique_files(files: list[Path]) -> list[Path]:
    """``files`` without repeats of the same file (by resolved path: the same name twice, a
    file inside a folder also given, overlapping folders, a symlink to a listed file), first
    occurrence kept; a warning names the files read once instead of several times."""
    seen: dict[Path, Path] = {}
    out: list[Path] = []
    repeated: dict[str, None] = {}
    for f in files:
        real = f.resolve()
        if real in seen:
            repeated[os.fspath(seen[real])] = None
            continue
        seen[real] = f
        out.append(f)
    if repeated:
        names = list(repeated)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        warnings.warn(
            f"--input: {len(names)} file(s) given more than once (by name, through a folder or "
            f"a link) are read once: {shown}",
            stacklevel=3,
        )
    return out


def _parquet_row_groups(path: Path) -> int:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UsageError(
            f"--input: reading parquet ({os.fspath(path)!r}) needs pyarrow: pip install pyarrow"
        ) from e
    try:
        return pq.ParquetFile(path).num_row_groups
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise UsageError(f"--input: {os.fspath(path)!r} is not a parquet file ({e})") from e


def _json_records(line: str, counts: SourceCounts) -> list[dict]:
    """The JSON object(s) of one JSONL line (``\\n``-terminated; a trailing ``\\r`` of CRLF
    endings is whitespace to JSON).  A line that does not parse but holds inner ``\\r``
    characters is read as records separated by lone CRs (classic Mac line endings): JSON
    strings cannot hold a raw CR, so outside a record it can only be a line break.  What is
    still not a JSON object is counted in ``counts.skipped_bad_json``."""
    try:
        pieces = [json.loads(line)]
    except json.JSONDecodeError:
        if "\r" not in line.strip():
            counts.skipped_bad_json += 1
            return []
        pieces = []
        for part in line.split("\r"):
            part = part.strip().removeprefix(_BOM)
            if not part:
                continue
            try:
                pieces.append(json.loads(part))
            except json.JSONDecodeError:
                counts.skipped_bad_json += 1
    records = [r for r in pieces if isinstance(r, dict)]
    counts.skipped_bad_json += len(pieces) - len(records)
    return records


def iter_documents(
    unit: Unit,
    counts: SourceCounts,
    text_field: str = "text",
    max_invalid_fraction: float = MAX_INVALID_FRACTION,
    record_format: str = "text",
) -> Iterator[str | Example]:
    """The documents of ``unit``, updating ``counts`` (read and skipped).

    With ``record_format="text"`` a document is a ``str``; otherwise (``auto`` or an
    instruction form, see :mod:`~kimi_linear.lightning.data.instruct`) it is an ``Example``:
    JSONL records and parquet rows are parsed in that form, and text files (and the builtin
    corpus) are plain-text examples under ``auto`` and skipped (``skipped_bad_record``) under an
    explicit instruction form.
    """
    if record_format != "text":
        yield from _iter_examples(unit, counts, text_field, max_invalid_fraction, record_format)
        return

    def accept(text: str | None) -> str | None:
        if text is None:
            counts.skipped_binary += 1
            return None
        if not text:
            counts.skipped_empty += 1
            return None
        counts.documents += 1
        counts.bytes += len(text.encode("utf-8"))
        return text

    if unit.kind == "builtin":
        from pydoc_data.topics import topics

        for key in sorted(topics)[unit.start : unit.stop]:
            doc = accept(topics[key])
            if doc is not None:
                yield doc
    elif unit.kind == "text":
        text = decode_text(Path(unit.path).read_bytes(), max_invalid_fraction)
        doc = accept(text.removeprefix(_BOM) if text is not None else None)
        if doc is not None:
            yield doc
    elif unit.kind == "jsonl":
        for record in _jsonl_records(unit, counts, max_invalid_fraction):
            text = record.get(text_field)
            if not isinstance(text, str):
                counts.skipped_no_text += 1
                continue
            doc = accept(text)
            if doc is not None:
                yield doc
    elif unit.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(unit.path)
        if text_field not in pf.schema_arrow.names:
            raise UsageError(
                f"--input: parquet file {unit.path!r} has no column {text_field!r} "
                f"(columns: {pf.schema_arrow.names}); choose one with --text_field"
            )
        for group in range(unit.start, unit.stop):
            column = pf.read_row_group(group, columns=[text_field]).column(0)
            for value in column.to_pylist():
                if not isinstance(value, str):
                    counts.skipped_no_text += 1
                    continue
                doc = accept(value)
                if doc is not None:
                    yield doc
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")


def _jsonl_records(unit: Unit, counts: SourceCounts, max_invalid_fraction: float) -> Iterator[dict]:
    """The JSON records of a ``jsonl`` unit's byte range ``[start, stop)`` (a line belongs to
    the unit it starts in); blank lines are skipped, binary lines counted in
    ``counts.skipped_binary`` and malformed ones by :func:`_json_records`."""
    with open(unit.path, "rb") as fh:
        if unit.start > 0:  # the line that starts before ``start`` belongs to the previous unit
            fh.seek(unit.start - 1)
            fh.readline()
        stop = unit.stop if unit.stop >= 0 else float("inf")
        while fh.tell() < stop:
            line = fh.readline()
            if not line:
                break
            if not line.strip():
                continue
            raw = decode_text(line, max_invalid_fraction)
            if raw is None:
                counts.skipped_binary += 1
                continue
            yield from _json_records(raw.removeprefix(_BOM), counts)


def _iter_examples(
    unit: Unit,
    counts: SourceCounts,
    text_field: str,
    max_invalid_fraction: float,
    record_format: str,
) -> Iterator[Example]:
    """:func:`iter_documents` for ``auto`` and the instruction forms (``Example`` objects)."""

    def accept(example: Example | None) -> Example | None:
        if example is None:
            counts.skipped_bad_record += 1
            return None
        if example.kind == "text" and not example.fields[0]:
            counts.skipped_empty += 1
            return None
        counts.documents += 1
        counts.bytes += example.num_bytes
        return example

    if unit.kind in ("builtin", "text"):
        if record_format != "auto":  # a plain text document has no prompt / response
            texts = SourceCounts()
            n = sum(1 for _ in iter_documents(unit, texts, text_field, max_invalid_fraction))
            counts.skipped_bad_record += n
            counts.skipped_binary += texts.skipped_binary
            counts.skipped_empty += texts.skipped_empty
            return
        texts = SourceCounts()
        for doc in iter_documents(unit, texts, text_field, max_invalid_fraction):
            ex = accept(Example("text", (doc,)))
            if ex is not None:
                yield ex
        counts.skipped_binary += texts.skipped_binary
        counts.skipped_empty += texts.skipped_empty
    elif unit.kind == "jsonl":
        for record in _jsonl_records(unit, counts, max_invalid_fraction):
            ex = accept(parse_record(record, record_format, text_field))
            if ex is not None:
                yield ex
    elif unit.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(unit.path)
        for group in range(unit.start, unit.stop):
            for record in pf.read_row_group(group).to_pylist():
                ex = accept(parse_record(record, record_format, text_field))
                if ex is not None:
                    yield ex
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")


__all__ = [
    "BUILTIN_CORPUS",
    "document_key",
    "is_held_out",
    "JSONL_EXTENSIONS",
    "MAX_INVALID_FRACTION",
    "PARQUET_EXTENSIONS",
    "SourceCounts",
    "TEXT_EXTENSIONS",
    "Unit",
    "decode_text",
    "iter_documents",
    "list_units",
]
