"""``kimi-linear export``: a trained checkpoint written in the released Hugging Face layout.

``config.json`` + safetensors under the release parameter names, through
:meth:`KimiLinearForCausalLM.save_pretrained`, with the files of a Hugging Face tokenizer; a
sharded (FSDP2) folder is consolidated tensor by tensor on disk; a LoRA run is merged, or its
adapters written alone (``--adapter_only``).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from kimi_linear.errors import PROG, UsageError
from kimi_linear.hf import check_output_dir
from kimi_linear.lightning.checkpoints import (
    is_sharded_checkpoint,
    load_sharded_checkpoint,
    recover_interrupted_save,
)
from kimi_linear.lightning.finetune import export_adapter
from kimi_linear.lightning.load import MISMATCH_HELP, TOKENIZER_HELP, load_model, resolve_tokenizer
from kimi_linear.model import cast_model_
from kimi_linear.tokenizer import HF_TOKENIZER_FILES, save_tokenizer_files

__all__ = ["export_main"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} export",
        description="Write a trained Lightning checkpoint in the released Kimi-Linear Hugging Face "
        "layout (config.json + safetensors under the release parameter names).",
    )
    p.add_argument(
        "--ckpt_path",
        required=True,
        help="Lightning checkpoint written by `kimi-linear fit`, or a checkpoint folder "
        "(config.json + safetensors: release, exported or transformers-saved)",
    )
    p.add_argument("--output_dir", required=True, help="folder to write (created if missing)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="allow a non-empty --output_dir (its checkpoint files are replaced)",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        default=None,
        help="cast the weights (A_log and dt_bias stay float32); default: as trained",
    )
    p.add_argument(
        "--max_shard_size", type=int, default=None, help="shard the weights (bytes per file)"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help=TOKENIZER_HELP + "; a Hugging Face tokenizer is copied into --output_dir",
    )
    p.add_argument("--allow_tokenizer_mismatch", action="store_true", help=MISMATCH_HELP)
    p.add_argument(
        "--adapter_only",
        action="store_true",
        help="a LoRA run's checkpoint: write the adapters alone in peft's format "
        "(adapter_config.json + adapter_model.safetensors) instead of the merged model",
    )
    return p


def export_main(argv: list[str]) -> int:
    """``kimi-linear export``: checkpoint -> ``save_pretrained`` folder."""
    args = _export_parser().parse_args(argv)
    try:  # refuse to replace a user's files unless asked to
        check_output_dir(args.output_dir, overwrite=args.overwrite)
    except ValueError as e:
        raise UsageError(f"--output_dir: {e}") from e
    if args.adapter_only:  # LoRA adapters alone (kimi_linear.lightning.finetune)
        export_adapter(args.ckpt_path, args.output_dir)
        print(f"exported the LoRA adapters of {args.ckpt_path} to {args.output_dir}")
        return 0
    recover_interrupted_save(args.ckpt_path)
    if is_sharded_checkpoint(args.ckpt_path):  # FSDP2: consolidated tensor by tensor, on disk
        dtype = None if args.dtype is None else _DTYPES[args.dtype]
        model = load_sharded_checkpoint(args.ckpt_path, dtype, offload_dir=args.output_dir)
    else:
        model = load_model(args.ckpt_path, "cpu")
    tok = resolve_tokenizer(
        args.tokenizer,
        args.ckpt_path,
        model.config.vocab_size,
        byte_fallback=False,
        allow_mismatch=args.allow_tokenizer_mismatch,
    )
    if args.dtype is not None:
        cast_model_(model, _DTYPES[args.dtype])
    if tok is not None:  # config.json / generation_config.json name the tokenizer's specials
        ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
        model.config = dataclasses.replace(model.config, **ids)
    try:
        model.save_pretrained(args.output_dir, max_shard_size=args.max_shard_size)
    except ValueError as e:
        raise UsageError(str(e)) from e
    same_folder = Path(args.ckpt_path).resolve() == Path(args.output_dir).resolve()
    if args.overwrite and not same_folder:  # no stale tokenizer of an earlier export
        for name in HF_TOKENIZER_FILES:
            (Path(args.output_dir) / name).unlink(missing_ok=True)
    written = [] if same_folder or tok is None else save_tokenizer_files(tok, args.output_dir)
    n = model.num_parameters()
    print(f"exported {n:,} parameters ({model.dtype}) of {args.ckpt_path} to {args.output_dir}")
    if written:
        print(f"with its tokenizer: {', '.join(written)}")
    elif tok is not None:
        print(f"note: the tokenizer ({tok.spec['kind']}) was not copied; pass it to generate "
              "as --tokenizer")  # fmt: skip
    return 0
