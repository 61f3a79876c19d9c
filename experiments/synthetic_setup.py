"""The synthetic-task study's setup: the four models, the profiles, and every deviation from the paper.

Used by :mod:`experiments.synthetic_tasks` (the command) and ``benchmarks/train_profile.py``
(which profiles the study's models).
"""

from __future__ import annotations

from typing import Any

from kimi_linear.lightning.module import KimiLinearLitModule

MODELS: dict[str, dict[str, Any]] = {
    "kda": {"num_hidden_layers": 2, "layer_types": ["kda"] * 2},
    "gdn": {"num_hidden_layers": 2, "layer_types": ["kda"] * 2, "kda_gate": "head"},
    # RoPE: a NoPE attention-only stack has no position signal (Kimi Linear's MLA layers get
    # theirs from the KDA layers), so it cannot form the previous-token heads MQAR needs.
    "mla": {"num_hidden_layers": 2, "layer_types": ["mla"] * 2, "mla_use_nope": False},
    # the only model with 4 layers: a 3:1 pattern needs them (the MLP widths match parameters)
    "hybrid": {"num_hidden_layers": 4, "layer_types": ["kda", "kda", "kda", "mla"]},
}


PROFILES: dict[str, dict[str, Any]] = {
    "paper": {
        "base": dict(hidden_size=256, num_experts=0, kda_num_heads=2,
                     kda_head_dim=128, num_attention_heads=2, qk_nope_head_dim=64,
                     qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=256),
        "reference_width": 1024,
        "tasks": {"mqar": {"num_kv_pairs": 16, "num_tokens": 256},
                  "palindrome": {"num_symbols": 64},
                  "stack": {"num_stacks": 64, "num_values": 64}},
        "train_lengths": [256, 512, 1024, 2048], "max_steps": 20_000, "eval_every": 500,
        "lrs": [5e-5, 1e-4, 5e-4, 1e-3], "batch_size": 32, "num_val": 256,
    },
    "cpu": {
        "base": dict(hidden_size=64, num_experts=0, kda_num_heads=4,
                     kda_head_dim=16, num_attention_heads=4, qk_nope_head_dim=16,
                     qk_rope_head_dim=16, v_head_dim=16, kv_lora_rank=64),
        "reference_width": 256,
        "tasks": {"mqar": {"num_kv_pairs": 8, "num_tokens": 64},
                  "palindrome": {"num_symbols": 16},
                  "stack": {"num_stacks": 64, "num_values": 16}},
        "train_lengths": [64], "max_steps": 3000, "eval_every": 100,
        "lrs": [5e-4, 1e-3, 3e-3], "batch_size": 32, "num_val": 256,
    },
}  # fmt: skip


#: What each profile changes from the paper's synthetic-task setup (Kimi Linear paper, 5.1).
DEVIATIONS: dict[str, list[str]] = {
    "paper": [
        "the hybrid has 4 layers (3 KDA + 1 MLA; a 3:1 pattern needs them), the others the "
        "paper's 2",
        "task options the paper does not state: Zoology's MQAR generator defaults (16 pairs, 256 "
        "tokens), palindrome over 64 symbols, 64 stacks of 64 values",
        "the MLA-only model uses RoPE (NoPE attention alone has no position signal)",
    ],
    "cpu": [
        "the hybrid has 4 layers (3 KDA + 1 MLA; a 3:1 pattern needs them), the others the "
        "paper's 2",
        "hidden 64 as 4 heads x 16 (KDA) / 4 heads with 16 + 16 query-key and 16 value dims "
        "(MLA) instead of 2 heads x 128",
        "one training length, 64 tokens, evaluated at 64 and 128, instead of 256 to 2048",
        "a cap of 3000 steps (batch 32) instead of up to 20K",
        "learning rates 5e-4, 1e-3, 3e-3 instead of 5e-5, 1e-4, 5e-4, 1e-3",
        "MQAR with 8 pairs over a 64-token vocabulary, palindrome over 16 symbols, 64 stacks of "
        "16 values",
        "the MLA-only model uses RoPE (NoPE attention alone has no position signal; measured in "
        "the module docstring)",
    ],
}


#: How the CPU profile was chosen (MQAR, 8 pairs over 64 tokens, length 64; answer accuracy):
#: the MLA-only sanity gate failed at every step until MQAR followed Zoology's layout (answers not
#: fed back) and the cap went from 1000 to 3000 steps. The "plain loop" and GPT figures come from
#: hand-run diagnostic loops on the same data (AdamW, batch 32, seed 0 unless stated), not from
#: this script; the others are runs of this script.
SETUP_HISTORY: list[str] = [
    "4 layers, 2 heads x 32, MLA-only NoPE, cap 1500, seed 0: MLA-only 0.30 / 0.29 / 0.25 at "
    "learning rates 5e-4 / 1e-3 / 3e-3. NoPE attention alone has no position signal for the "
    "previous-token head recall needs: a plain two-layer NoPE GPT fails too (0.18 after 1500 "
    "steps) where the same GPT with learned positions reaches 1.00 after 500",
    "the same with RoPE: 0.36 / 0.40 / 0.26",
    "4 layers, 4 heads x 16, RoPE, cap 1000 (25 of 60 runs, then stopped): MLA-only 0.28 / "
    "0.40 / 0.35; KDA 0.24 / 0.30 / 0.96",
    "a plain training loop (no Lightning; AdamW betas (0.9, 0.999), constant lr 1e-3, MLP width "
    "256): a 2-layer 4-head RoPE MLA-only model reached 0.99 by step 750; with 4 layers 0.37 at step 750",
    "2 layers for KDA, GDN-like and MLA-only, 4 for the hybrid, 4 heads x 16, cap 1000 (this "
    "profile; MQAR finished, 20 runs): MLA-only 0.33 / 0.40 / 0.37 (seeds 1, 2 at 1e-3: 0.40, "
    "0.39): the gate fails",
    "plain-loop checks at the study's MLP width (614): betas (0.9, 0.95) with a constant lr 1e-3: "
    "0.38 after 1000 steps; betas (0.9, 0.999) with the study's warmup + cosine: 0.39. The one "
    "success (width 256, constant lr) was not reproduced at the matched width: the transition "
    "to recall is slow and seed- and width-sensitive at this size. Next: a longer cap (several "
    "thousand steps) or the paper-size profile on a GPU",
    "a first cause: the learning rate follows warmup + cosine over the cap, so a 1000-step cap "
    "decays it early. This script, MLA-only, lr 1e-3, seed 0: cap 1000 (commit 1062ab6): 0.28 / "
    "0.40 at steps 500 / 1000; cap 3000: 0.992 at step 1400. Plain loop (the study's model, "
    "data, AdamW and schedule, no Lightning): 0.36 / 0.39 at steps 500 / 1000 with the cosine "
    "over 1000 steps, 0.77 / 0.97 / 0.993 at steps 500 / 1000 / 1250 with it over 3000. (The "
    "earlier plain-loop figures came from a loop that was not kept; this one did not reproduce "
    "them.) But at cap 3000 seeds 1 and 2 stayed at 0.388 / 0.391 (lr 5e-4 and 3e-3, seed 0: "
    "0.392 / 0.389): the gate still failed (0.590)",
    "the second cause, in the data: the MQAR generator fed each answer back into the input, "
    "unlike Zoology's, so an answer already given tells which values are still unqueried. The "
    "0.39 plateau is that elimination, not recall: a stuck model (plain loop, step 600, 0.32 "
    "overall) scores 0.24 on the first query of a sequence and 0.68 on the last. Changing the "
    "model did not leave the plateau (plain loop, lr 1e-3, seeds 1 and 2, 1000 steps): rope "
    "dims 32: 0.39 / 0.37; rope theta 500: 0.39 / 0.36; MLP width 256: 0.38 / 0.98",
    "Zoology's layout (this profile): answer slots hold filler in the input, values are "
    "distinct (kimi_linear.lightning.data.MQARTask). Cap 3000, MLA-only: lr 5e-4: 0.765 / "
    "0.981 / 0.993 (seeds 0 / 1 / 2; recall starts after about 1800 steps on seed 0), lr 1e-3 "
    "and 3e-3 (seed 0): 0.155 / 0.160, at the loss of a uniform guess among the 8 values in "
    "context (ln 8). The gate passes (0.913). Learned absolute positions added to the MLA-only "
    "model (plain loop, lr 1e-3, seeds 1 and 2) stay at that plateau too (0.17 / 0.16 after "
    "1500 steps): its slow start is not for lack of a position signal",
]


#: The CPU profile's task options (also used by benchmarks/train_profile.py).
TASKS: dict[str, dict[str, Any]] = PROFILES["cpu"]["tasks"]


BASE = PROFILES["cpu"]["base"]


SANITY_THRESHOLD = 0.9


def count_parameters(overrides: dict[str, Any], vocab_size: int) -> int:
    module = KimiLinearLitModule(preset="tiny", overrides=overrides, vocab_size=vocab_size)
    return module.model.num_parameters()


def matched_overrides(
    vocab_size: int, backend: str, profile: str = "cpu"
) -> dict[str, tuple[dict[str, Any], int]]:
    """Per model: overrides whose MLP width brings its parameter count to the hybrid's."""
    base = {**PROFILES[profile]["base"], "kda_backend": backend}
    ref = PROFILES[profile]["reference_width"]
    target = count_parameters({**base, **MODELS["hybrid"], "intermediate_size": ref}, vocab_size)
    out = {}
    for name, kinds in MODELS.items():
        p1 = count_parameters({**base, **kinds, "intermediate_size": 64}, vocab_size)
        p2 = count_parameters({**base, **kinds, "intermediate_size": 128}, vocab_size)
        per_unit = (p2 - p1) / 64
        width = max(8, round(64 + (target - p1) / per_unit))
        ov = {**base, **kinds, "intermediate_size": width}
        out[name] = (ov, count_parameters(ov, vocab_size))
    return out
