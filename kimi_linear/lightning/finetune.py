"""LoRA fine-tuning of :class:`~kimi_linear.model.KimiLinearForCausalLM` through ``peft``.

The model code knows nothing of peft: adapters are injected here, into the model itself
(``peft.get_peft_model``; the model object keeps its class, its modules are wrapped in place),
and :class:`~kimi_linear.lightning.module.KimiLinearLitModule` calls this module when its
``lora`` option is set::

    model:
      init_from: export/            # a released / exported folder
      optimizer: adamw
      lora: {targets: [q_proj, o_proj, kv_b_proj, experts], r: 8, alpha: 16}

**Targets** are module names, matched as peft does (a module whose dotted name equals the
target or ends with ``.target``): the attention projections (KDA ``q_proj`` / ``k_proj`` /
``v_proj`` / ``o_proj``, the gate / beta projections ``f_a_proj``, ``f_b_proj``, ``b_proj``,
``g_a_proj``, ``g_b_proj``; MLA ``q_proj`` / ``q_a_proj`` / ``q_b_proj``,
``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``), the dense and shared-expert MLPs
(``gate_proj``, ``up_proj``, ``down_proj``), ``lm_head`` and ``embed_tokens``, and the routed
experts: ``experts`` (every :class:`~kimi_linear.layers.moe.GroupedExperts`, its stacked
``w1`` / ``w2`` / ``w3 [E, out, in]``, one rank-``r`` adapter per expert through peft's
``target_parameters``) or ``experts.w1`` etc. for one of the three.  ``all-linear`` names every
``nn.Linear`` but ``lm_head``.  A target that matches no module is a one-line
:class:`~kimi_linear.errors.UsageError` naming the closest module name and listing the names
that can be targeted; one that names a module LoRA cannot adapt (a norm, a short convolution,
the router) is refused the same way.

**Only the adapters train**: peft freezes every other parameter, so the optimizer gets the
adapters only (``kimi_linear.optim`` groups trainable parameters only: under MuonClip the 2-D
``lora_A`` / ``lora_B`` matrices go to Muon; the recipe uses AdamW).  Two model-side updates
that are not gradient steps are turned off by the LitModule under LoRA, so the frozen base stays
bit-identical and the adapters alone describe the fine-tune: QK-Clip (it would rescale the frozen
query / ``kv_b_proj`` weights; MuonClip also skips an MLA layer whose weights are frozen, see
``MuonClip``) and the MoE router-bias balancing update.  The MLA max logits are still logged.

**Merge and save**: :func:`merge_lora` folds the adapters into the weights (``W + (alpha / r)
B A``; per expert for the experts) and returns the plain model, whose
``save_pretrained`` writes the release layout (the same safetensors names as a full model,
loadable by ``KimiLinearForCausalLM.from_pretrained`` and transformers).
:func:`save_adapter` / :func:`load_adapter` write and read the adapters alone in peft's format
(``adapter_config.json`` + ``adapter_model.safetensors``).  ``kimi-linear export`` merges a
LoRA run's checkpoint (``--adapter_only`` writes the adapters instead); ``generate``,
``evaluate`` and ``retrieval`` load it merged.

Not supported (refused with an error): sharded training (FSDP2) with LoRA, and dropout on the
routed experts (peft's parameter LoRA has none).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kimi_linear.errors import UsageError, did_you_mean, import_failure
from kimi_linear.layers.experts import GroupedExperts
from kimi_linear.lightning.callbacks import load_checkpoint
from kimi_linear.lightning.checkpoints import check_checkpoint_file
from kimi_linear.lightning.hparams import assign_weights, config_from_hparams, meta_model

#: peft's name of the one adapter
ADAPTER_NAME = "default"
_INSTALL = "pip install 'kimi-linear[finetune]' (peft)"


def require_peft(arg: str = "model.lora") -> Any:
    """The ``peft`` module, or a one-line :class:`UsageError` naming ``arg`` when it is missing
    (or broken)."""
    try:
        import peft
    except ImportError as e:
        raise UsageError(f"{arg}: LoRA needs peft: {import_failure(e, 'peft', _INSTALL)}") from e
    return peft


@dataclasses.dataclass(frozen=True)
class LoraOptions:
    """The ``lora`` option of :class:`~kimi_linear.lightning.module.KimiLinearLitModule`.

    Attributes:
        targets: module names to adapt (see the module docstring); default: every attention
            projection of KDA and MLA.
        r: adapter rank (> 0).
        alpha: scale numerator; the update is ``(alpha / r) B A`` (``alpha / sqrt(r)`` with
            ``rslora``).
        dropout: dropout on the adapters' input, in ``[0, 1)`` (0 when ``experts`` is a target).
        rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
    """

    targets: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "kv_a_proj_with_mqa",
        "kv_b_proj",
    )
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        targets = tuple(self.targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise UsageError(
                f"model.lora.targets must be a non-empty list of module names, got {self.targets!r}"
            )
        object.__setattr__(self, "targets", targets)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise UsageError(f"model.lora.r must be an int >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise UsageError(f"model.lora.alpha must be a number > 0, got {self.alpha!r}")
        if not self.alpha > 0:
            raise UsageError(f"model.lora.alpha must be a number > 0, got {self.alpha!r}")
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
            raise UsageError(f"model.lora.dropout must be in [0, 1), got {d!r}")
        if not isinstance(self.rslora, bool):
            raise UsageError(f"model.lora.rslora must be true or false, got {self.rslora!r}")

    @classmethod
    def from_value(cls, value: LoraOptions | Mapping[str, Any] | None) -> LoraOptions | None:
        """``None`` (no LoRA), a :class:`LoraOptions`, or a dict of its fields (from YAML);
        an unknown key is a :class:`UsageError` naming the closest field."""
        if value is None or isinstance(value, LoraOptions):
            return value
        if not isinstance(value, Mapping):
            raise UsageError(f"model.lora must be a mapping of LoRA options or null, got {value!r}")
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in value:
            if key not in fields:
                raise UsageError(
                    f"model.lora: unknown option {key!r}{did_you_mean(key, fields)} "
                    f"(options: {fields})"
                )
        kwargs = dict(value)
        if "targets" in kwargs and isinstance(kwargs["targets"], list):
            kwargs["targets"] = tuple(kwargs["targets"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d


# ----------------------------------------------------------------------------- targets
def _is_experts(module: nn.Module) -> bool:
    return isinstance(module, GroupedExperts)


_EXPERT_PARAMS = ("w1", "w2", "w3")


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding)) or _is_experts(module)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def resolve_targets(model: nn.Module, options: LoraOptions) -> tuple[list[str], list[str]]:
    """``(target_modules, target_parameters)``: the full dotted names of the ``nn.Linear`` /
    ``nn.Embedding`` modules and of the stacked expert parameters that ``options.targets``
    name in ``model`` (peft's matching rule; see the module docstring).

    Raises:
        UsageError: a target matches no module (naming the closest module name and listing
            the targetable ones), or names a module LoRA cannot adapt, or ``dropout > 0`` with
            experts targeted.
    """
    modules = dict(model.named_modules())
    leaves: dict[str, None] = {}  # targetable short names, in model order
    for name, mod in modules.items():
        if name and _adaptable(mod):
            leaves[name.rsplit(".", 1)[-1]] = None
            if _is_experts(mod):
                for p in _EXPERT_PARAMS:
                    leaves[f"experts.{p}"] = None
    leaves["all-linear"] = None
    linear: dict[str, None] = {}
    params: dict[str, None] = {}
    for target in options.targets:
        if target == "all-linear":
            for name, mod in modules.items():
                if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head":
                    linear[name] = None
            continue
        found = [(n, m) for n, m in modules.items() if n and _matches(n, target)]
        expert_params = [
            f"{n}.{p}"
            for n, m in modules.items()
            if _is_experts(m)
            for p in _EXPERT_PARAMS
            if _matches(f"{n}.{p}", target)
        ]
        if not found and not expert_params:
            close = did_you_mean(target, [*leaves, *(n for n in modules if n)])
            raise UsageError(
                f"model.lora.targets: {target!r} matches no module of the model{close}; "
                f"targetable names: {sorted(leaves)}"
            )
        wrong = sorted({type(m).__name__ for _, m in found if not _adaptable(m)})
        if wrong:
            raise UsageError(
                f"model.lora.targets: {target!r} names {'/'.join(wrong)} modules, which LoRA "
                f"cannot adapt (nn.Linear, nn.Embedding and the routed experts only); "
                f"targetable names: {sorted(leaves)}"
            )
        for n, m in found:
            if _is_experts(m):
                for p in _EXPERT_PARAMS:
                    params[f"{n}.{p}"] = None
            else:
                linear[n] = None
        for p in expert_params:
            params[p] = None
    if params and options.dropout:
        raise UsageError(
            f"model.lora.dropout must be 0 when the routed experts are targeted (peft's LoRA on "
            f"stacked expert weights has no dropout), got {options.dropout}"
        )
    return list(linear), list(params)


def lora_config(model: nn.Module, options: LoraOptions) -> Any:
    """The ``peft.LoraConfig`` of ``options`` for ``model`` (targets resolved to full names)."""
    peft = require_peft()
    modules, params = resolve_targets(model, options)
    return peft.LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        use_rslora=options.rslora,
        target_modules=modules or None,
        target_parameters=params or None,
        bias="none",
    )


def check_targets(config: Any, options: LoraOptions) -> None:
    """Resolve ``options.targets`` against the model of ``config`` built on the meta device
    (no memory): the same errors as :func:`resolve_targets`, before any weight is loaded."""
    resolve_targets(meta_model(config), options)


# ----------------------------------------------------------------------------- adapters
def apply_lora(model: nn.Module, options: LoraOptions) -> Any:
    """Inject LoRA adapters into ``model`` in place and freeze everything else; returns the
    ``peft.PeftModel`` that holds it (``peft_model.base_model.model is model``).

    Adapters start as peft's default (``A`` Kaiming-uniform, ``B = 0``), so the adapted model
    first computes exactly what ``model`` did.  They are created on the device and in the dtype
    of the weights they adapt.
    """
    peft = require_peft()
    config = lora_config(model, options)
    return peft.get_peft_model(model, config, adapter_name=ADAPTER_NAME)


def merge_lora(peft_model: Any) -> nn.Module:
    """Fold the adapters of ``peft_model`` into its weights and remove them; returns the plain
    model (same object as before :func:`apply_lora`), whose ``state_dict`` has the release
    names again."""
    return peft_model.merge_and_unload()


def save_adapter(peft_model: Any, path: str | os.PathLike) -> Path:
    """Write the adapters alone in peft's format (``adapter_config.json`` +
    ``adapter_model.safetensors``) to the folder ``path``."""
    out = Path(path)
    # the adapters only: never the (frozen) embedding / LM head weights themselves
    peft_model.save_pretrained(os.fspath(out), safe_serialization=True, save_embedding_layers=False)
    return out


def load_adapter(
    model: nn.Module, path: str | os.PathLike, merge: bool = False, trainable: bool = False
) -> Any:
    """Adapters saved by :func:`save_adapter` (or peft) applied to ``model`` (the base model
    they were trained on); returns the ``PeftModel``, or with ``merge=True`` the merged model.

    Raises:
        UsageError: ``path`` is not an adapter folder, or peft is missing.
    """
    peft = require_peft("--adapter")
    p = Path(path)
    if not (p / "adapter_config.json").is_file():
        raise UsageError(
            f"--adapter: {os.fspath(path)!r} is not a LoRA adapter folder (no adapter_config.json)"
        )
    peft_model = peft.PeftModel.from_pretrained(
        model, os.fspath(p), adapter_name=ADAPTER_NAME, is_trainable=trainable
    )
    return merge_lora(peft_model) if merge else peft_model


def trainable_summary(model: nn.Module) -> str:
    """``"12,288 of 1,234,567 parameters train (1.00%)"``."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{train:,} of {total:,} parameters train ({100 * train / max(total, 1):.2f}%)"


def model_from_lora_checkpoint(
    hparams: Mapping[str, Any], weights: Mapping[str, torch.Tensor], path: str | os.PathLike
) -> nn.Module:
    """The merged :class:`~kimi_linear.model.KimiLinearForCausalLM` of a LoRA run's Lightning
    checkpoint (``hyper_parameters`` with ``lora``; ``weights`` without the ``model.`` prefix,
    adapter names included): built on the meta device, adapters injected, every tensor
    assigned, then merged."""
    return merge_lora(peft_model_from_lora_checkpoint(hparams, weights, path))


def peft_model_from_lora_checkpoint(
    hparams: Mapping[str, Any], weights: Mapping[str, torch.Tensor], path: str | os.PathLike
) -> Any:
    """As :func:`model_from_lora_checkpoint`, unmerged: the ``PeftModel`` (for
    :func:`save_adapter`)."""
    p = Path(path)
    options = LoraOptions.from_value(hparams.get("lora"))
    if options is None:
        raise UsageError(f"{os.fspath(p)!r} is not a LoRA run's checkpoint (no model.lora)")
    model = meta_model(config_from_hparams(dict(hparams), p))
    peft_model = apply_lora(model, options)
    unexpected = sorted(set(weights) - set(model.state_dict()))
    if unexpected:
        raise UsageError(f"{os.fspath(p)!r}: unexpected weights for this config: {unexpected[:5]}")
    assign_weights(model, dict(weights), p)
    return peft_model


__all__ = [
    "ADAPTER_NAME",
    "LoraOptions",
    "apply_lora",
    "check_targets",
    "export_adapter",
    "load_adapter",
    "lora_config",
    "merge_lora",
    "model_from_lora_checkpoint",
    "peft_model_from_lora_checkpoint",
    "require_peft",
    "resolve_targets",
    "save_adapter",
    "trainable_summary",
]


def export_adapter(ckpt_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """``kimi-linear export --adapter_only``: the adapters of a LoRA run's Lightning checkpoint
    written alone (:func:`save_adapter`) to ``output_dir``."""
    p = Path(ckpt_path)
    if p.is_dir() or not p.exists():
        raise UsageError(
            f"--adapter_only: {os.fspath(ckpt_path)!r} is not a LoRA run's Lightning checkpoint "
            "file (.ckpt)"
        )
    check_checkpoint_file(p)
    ckpt = load_checkpoint(p)
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or not isinstance(state, dict):
        raise UsageError(f"--ckpt_path: {os.fspath(p)!r} is not a kimi-linear Lightning checkpoint")
    if hparams.get("lora") is None:
        raise UsageError(
            f"--adapter_only: {os.fspath(p)!r} was not trained with model.lora (no adapters)"
        )
    weights = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    return save_adapter(peft_model_from_lora_checkpoint(hparams, weights, p), output_dir)
