"""Fine-tuning: instruction / chat data with the loss masked to the responses (``prepare
--format``), LoRA through peft on the kit's model (targets, merge, adapters alone, the Lightning
path, QK-Clip on frozen weights) and the named errors."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.errors import UsageError
from kimi_linear.lightning.data import IGNORE_INDEX, TokenDataModule, prepare
from kimi_linear.lightning.data.instruct import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    ChatRenderer,
    encode_segments,
    make_renderer,
    parse_record,
)
from kimi_linear.lightning.data.shards import TokenShards
from kimi_linear.tokenizer import ByteTokenizer

peft = pytest.importorskip("peft")
from kimi_linear.lightning import finetune  # noqa: E402

BYTE = ByteTokenizer()
EOS = BYTE.eos_id
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
}
ALPACA = {"instruction": "Say yes", "input": "", "output": "Yes"}
ALPACA_IN = {"instruction": "Add", "input": "1 2", "output": "3"}
PC = {"prompt": "Q: sky? A:", "completion": " blue"}


def _responses(ids: list[int], mask: list[bool]) -> list[list[int]]:
    """Maximal runs of in-loss ids."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def _enc(record: dict, fmt: str = "auto") -> tuple[list[int], list[bool]]:
    ex = parse_record(record, fmt)
    return encode_segments(ChatRenderer("builtin").render(ex), BYTE.encode, EOS)


# ------------------------------------------------------------------------ masking, token level
def test_chat_mask_is_exactly_the_assistant_replies_and_their_eos():
    ids, mask = _enc(CHAT, "chat")
    first = b"<|system|>\nBe brief.\n<|user|>\nHi?\n<|assistant|>\nHello."
    second = b"<|user|>\n2+2?\n<|assistant|>\n4"
    assert ids == [*first, EOS, *second, EOS]
    assert _responses(ids, mask) == [list(b"Hello.") + [EOS], list(b"4") + [EOS]]
    # every prompt token (tags, system, user) is out of the loss
    assert sum(mask) == len("Hello.") + 1 + len("4") + 1


def test_alpaca_and_prompt_completion_masks():
    ids, mask = _enc(ALPACA, "alpaca")
    prompt = ALPACA_PROMPT_NO_INPUT.format(instruction="Say yes").encode()
    assert ids == list(prompt) + list(b"Yes") + [EOS]
    assert mask == [False] * len(prompt) + [True] * 4
    ids, mask = _enc(ALPACA_IN, "alpaca")
    prompt = ALPACA_PROMPT.format(instruction="Add", input="1 2").encode()
    assert ids[: len(prompt)] == list(prompt) and _responses(ids, mask) == [list(b"3") + [EOS]]
    ids, mask = _enc(PC, "prompt_completion")
    assert ids == list(b"Q: sky? A: blue") + [EOS]
    assert mask == [False] * len("Q: sky? A:") + [True] * (len(" blue") + 1)


def test_auto_detects_each_form_and_rejects_bad_records():
    assert [parse_record(r, "auto").kind for r in (CHAT, ALPACA, PC, {"text": "x"})] == [
        "chat",
        "alpaca",
        "prompt_completion",
        "text",
    ]
    bad = [
        {"messages": [{"role": "user", "content": "no reply"}]},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": "not a list"},
        {"instruction": "x", "output": 3},
        {"prompt": "x", "completion": ""},
        {"other": 1},
    ]
    assert all(parse_record(r, "auto") is None for r in bad)


def test_tokenizer_chat_template_masks_the_replies(tmp_path):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from kimi_linear.tokenizer import byte_tokenizer_json, load_tokenizer

    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(byte_tokenizer_json()), eos_token="<eos>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    renderer = make_renderer("auto", tok)
    assert renderer.template == "tokenizer"
    segments = renderer.render(parse_record(CHAT, "chat"))
    ids, mask = encode_segments(segments, tok.encode, tok.eos_id)
    replies = [tok._tok.decode(r) for r in _responses(ids, mask)]
    assert replies == ["Hello.<|im_end|>\n", "4<|im_end|>\n<eos>"]
    assert "".join(t for t, _ in segments if t) == fast.apply_chat_template(
        CHAT["messages"], tokenize=False
    )
    with pytest.raises(UsageError, match="--chat_template tokenizer: the tokenizer has no chat"):
        make_renderer("tokenizer", BYTE)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        a, b = i % 17, (3 * i) % 13
        out.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": f"{a + b}."},
                ]
            }
        )
        out.append({"instruction": f"Echo {i}", "input": "", "output": f"{i}"})
        out.append({"prompt": f"n{i}=", "completion": f"{i}"})
    return out


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chat")
    src = _write_jsonl(root / "mix.jsonl", _records(60) + [{"other": 1}])
    prepare([src], root / "data", record_format="auto", val_fraction=0.1, num_workers=0,
            progress=False)  # fmt: skip
    return root / "data"


def test_prepare_stores_masks_that_match_the_rendering(chat_data):
    meta = json.loads((chat_data / "meta.json").read_text())
    assert meta["records"] == {"format": "auto", "chat_template": "builtin"}
    assert meta["summary"]["skipped_bad_record"] == 1
    shards = TokenShards(chat_data, "train", meta)
    assert shards.has_loss_mask
    ids = shards.read(0, shards.num_tokens).tolist()
    mask = shards.read_loss_mask(0, shards.num_tokens).tolist()
    expected = {tuple(_responses(*_enc(r))[0]) for r in _records(60)}  # one reply each
    got = _responses(ids, mask)
    assert len(got) == shards.num_documents and all(tuple(r) in expected for r in got)
    assert meta["summary"]["train_loss_tokens"] == sum(mask)


@pytest.mark.parametrize("pack", ["reset", "window"])
def test_packing_keeps_the_mask_aligned(chat_data, pack):
    dm = TokenDataModule(str(chat_data), seq_len=48, batch_size=4, pack=pack)
    dm.setup("fit")
    shards = dm.train_set.shards
    for b, batch in enumerate(dm.train_dataloader()):
        if b == 3:
            break
        ids, labels = batch["input_ids"], batch["labels"]
        assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
        for row in range(ids.shape[0]):  # find the window of this row and its stored mask
            w = [i for i in range(len(dm.train_set)) if torch.equal(dm.train_set[i]["input_ids"],
                                                                    ids[row])]  # fmt: skip
            start = w[0] * 48
            keep = torch.from_numpy(shards.read_loss_mask(start, start + 48))
            if pack == "reset":
                keep[torch.from_numpy(shards.document_starts(start, start + 48))] = False
                keep[0] = False
            assert torch.equal(labels[row] != IGNORE_INDEX, keep), (b, row)


# ------------------------------------------------------------------------ LoRA on the model
def _tiny(seed: int = 0, **overrides) -> KimiLinearForCausalLM:
    cfg = KimiLinearConfig.from_preset("tiny", vocab_size=259, kda_backend="torch", **overrides)
    torch.manual_seed(seed)
    return KimiLinearForCausalLM(cfg).eval()


ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "kv_a_proj_with_mqa", "kv_b_proj", "f_a_proj",
       "gate_proj", "experts", "lm_head")  # fmt: skip


def _randomize_adapters_(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_targets_resolve_and_only_adapters_train():
    model = _tiny()
    opts = finetune.LoraOptions(targets=ALL, r=4, alpha=8)
    modules, params = finetune.resolve_targets(model, opts)
    assert "model.layers.3.self_attn.kv_b_proj" in modules and "lm_head" in modules
    assert "model.layers.1.block_sparse_moe.experts.w2" in params
    assert not any("shared_experts.experts" in p for p in params)
    finetune.apply_lora(model, opts)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    experts = model.model.layers[1].block_sparse_moe.experts
    assert any("lora_" in n for n, _ in experts.named_parameters())


def test_merged_model_equals_the_adapted_model(tmp_path):
    model = _tiny()
    pm = finetune.apply_lora(model, finetune.LoraOptions(targets=ALL, r=4, alpha=8))
    _randomize_adapters_(model)
    ids = torch.randint(0, 259, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(ids)
        adapted_gen = model.generate(ids[:, :9], max_new_tokens=8, temperature=0)
        base_like = _tiny()(ids)
    assert (adapted - base_like).abs().max() > 1e-2  # the adapters change the model
    merged = finetune.merge_lora(pm)
    assert type(merged) is KimiLinearForCausalLM and not any(
        "lora" in k or "base_layer" in k for k in merged.state_dict()
    )
    with torch.no_grad():
        err = (merged(ids) - adapted).abs().max() / adapted.abs().max()
        # cached decoding: MLA's absorbed kv_b_proj sees the unmerged adapter too
        assert torch.equal(merged.generate(ids[:, :9], max_new_tokens=8, temperature=0),
                           adapted_gen)  # fmt: skip
    assert err <= 1e-5
    merged.save_pretrained(tmp_path / "merged")  # the release layout, loadable as a full model
    back = KimiLinearForCausalLM.from_pretrained(tmp_path / "merged", kda_backend="torch").eval()
    with torch.no_grad():
        assert torch.equal(back(ids), merged(ids))


def test_adapters_alone_round_trip(tmp_path):
    model = _tiny()
    pm = finetune.apply_lora(model, finetune.LoraOptions(targets=ALL, r=4, alpha=8))
    _randomize_adapters_(model)
    ids = torch.randint(0, 259, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)
    finetune.save_adapter(pm, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    merged = finetune.load_adapter(_tiny(), tmp_path / "adapter", merge=True)
    with torch.no_grad():
        assert (merged(ids) - want).abs().max() <= 1e-5 * want.abs().max()
    with pytest.raises(UsageError, match="--adapter: .* is not a LoRA adapter folder"):
        finetune.load_adapter(_tiny(), tmp_path)


def test_qk_clip_never_touches_frozen_weights():
    from kimi_linear.optim import MuonClip

    model = _tiny()
    finetune.apply_lora(model, finetune.LoraOptions(targets=("q_proj", "kv_b_proj"), r=4))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = MuonClip(model, lr=1e-2, qk_clip_tau=1e-3)  # every head is far above tau
    model.train()
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    with pytest.warns(UserWarning, match="QK-Clip skips MLA layer .*frozen"):
        opt.step()
    assert opt.last_max_logits and not opt.last_clip_gamma
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


# ------------------------------------------------------------------------ named errors
def test_a_target_matching_no_module_is_a_named_error():
    model = _tiny()
    with pytest.raises(UsageError) as e:
        finetune.resolve_targets(model, finetune.LoraOptions(targets=("q_proj", "kv_b_prj")))
    msg = str(e.value)
    assert "\n" not in msg and "model.lora.targets: 'kv_b_prj' matches no module" in msg
    assert "did you mean 'kv_b_proj'" in msg and "'kv_a_proj_with_mqa'" in msg
    with pytest.raises(UsageError, match="'input_layernorm' names RMSNorm modules, which LoRA"):
        finetune.resolve_targets(model, finetune.LoraOptions(targets=("input_layernorm",)))
    with pytest.raises(UsageError, match="dropout must be 0 when the routed experts"):
        finetune.resolve_targets(model, finetune.LoraOptions(targets=("experts",), dropout=0.1))
    with pytest.raises(UsageError, match="model.lora: unknown option 'alhpa' \\(did you mean"):
        finetune.LoraOptions.from_value({"alhpa": 4})
    with pytest.raises(UsageError, match="model.lora.r must be an int >= 1"):
        finetune.LoraOptions.from_value({"r": 0})


def test_lit_module_refuses_a_bad_target_before_any_work():
    from kimi_linear.lightning.module import KimiLinearLitModule

    with pytest.raises(UsageError, match="'o_prj' matches no module .*did you mean 'o_proj'"):
        KimiLinearLitModule(preset="tiny", lora={"targets": ["o_prj"]})


def test_missing_peft_is_a_named_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(UsageError, match=r"model.lora: LoRA needs peft: .*kimi-linear\[finetune\]"):
        finetune.require_peft()


# ------------------------------------------------------------------------ the Lightning path
def _response_loss(model, batch) -> float:
    with torch.no_grad():
        B, T = batch["input_ids"].shape
        return model(
            batch["input_ids"].reshape(1, B * T),
            labels=batch["labels"].reshape(1, B * T),
            cu_seqlens=batch["cu_seqlens"],
        ).loss.item()


def test_lora_fit_lowers_the_response_loss_and_changes_only_adapters(chat_data, tmp_path):
    import lightning.pytorch as pl

    from kimi_linear.lightning.load import load_model
    from kimi_linear.lightning.module import KimiLinearLitModule

    base = _tiny(num_hidden_layers=4)
    base.save_pretrained(tmp_path / "base")
    dm = TokenDataModule(str(chat_data), seq_len=64, batch_size=4, pack="reset")
    module = KimiLinearLitModule(
        init_from=str(tmp_path / "base"),
        overrides={"kda_backend": "torch"},
        vocab_size=259,
        optimizer="muonclip",  # QK-Clip is off under LoRA: no warning, no frozen weight touched
        lr=5e-3,
        weight_decay=0.0,
        warmup_steps=1,
        lora={"targets": list(ALL), "r": 4, "alpha": 8},
    )
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    before_loss = _response_loss(module.model.eval(), batch)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = pl.Trainer(
        max_steps=12, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    module.model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="QK-Clip skips")  # the clip is off under LoRA
        trainer.fit(module, datamodule=dm)
    after = module.model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)[:5]
    assert any("lora_B" in k for k in changed)
    after_loss = _response_loss(module.model.eval(), batch)
    assert after_loss < before_loss - 0.05, (before_loss, after_loss)
    # a LoRA run's checkpoint loads merged (generate / export / evaluate), equal to the module
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    merged = load_model(tmp_path / "lora.ckpt")
    ids = batch["input_ids"][:1]
    with torch.no_grad():
        want = module.model(ids)
        assert (merged(ids) - want).abs().max() <= 1e-5 * want.abs().max()
    from kimi_linear.lightning.finetune import export_adapter

    export_adapter(tmp_path / "lora.ckpt", tmp_path / "adapter")
    again = finetune.load_adapter(KimiLinearForCausalLM.from_pretrained(tmp_path / "base"),
                                  tmp_path / "adapter", merge=True)  # fmt: skip
    with torch.no_grad():
        assert (again(ids) - want).abs().max() <= 1e-5 * want.abs().max()


# ------------------------------------------------------------------------ transformers
_TF_SCRIPT = """
import sys, json
sys.modules["fla"] = None  # transformers' pure-PyTorch KDA
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.tensor([json.loads(sys.argv[2])])
out = m.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
print(json.dumps(out[0, ids.shape[1]:].tolist()))
"""


@pytest.mark.slow
def test_merged_folder_loads_in_transformers(tmp_path):
    pytest.importorskip("transformers.models.kimi_linear")
    model = _tiny()
    pm = finetune.apply_lora(model, finetune.LoraOptions(targets=ALL, r=4, alpha=8))
    _randomize_adapters_(model, seed=3)
    merged = finetune.merge_lora(pm)
    merged.save_pretrained(tmp_path / "merged")
    prompt = torch.randint(0, 259, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        kit = merged.generate(prompt, max_new_tokens=8, temperature=0)[0, 11:].tolist()
    proc = subprocess.run(
        [sys.executable, "-c", _TF_SCRIPT, str(tmp_path / "merged"), json.dumps(prompt[0].tolist())],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == kit
