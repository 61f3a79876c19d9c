"""Hugging Face interop: the public names of the on-disk formats, one import away.

Three modules, one job each (and none of them imports :mod:`kimi_linear.model`: the functions
that need a model take it as an argument, as transformers' adapters do):

* :mod:`~kimi_linear.hf.config_json`: :class:`~kimi_linear.config.KimiLinearConfig` <->
  ``config.json`` (release and transformers forms; :func:`config_from_hf`,
  :func:`config_to_hf`, :data:`IGNORED_KEYS`, :data:`NOOP_KEYS`);
* :mod:`~kimi_linear.hf.weight_names`: the kit's parameter names <-> the release's and
  transformers' (:func:`route_weight`, :func:`release_state_dict`);
* :mod:`~kimi_linear.hf.checkpoint`: safetensors save / memory-lean strict load
  (:func:`save_pretrained`, :func:`plan_load` + :func:`fill_weights_`, :func:`load_weights_`).

``KimiLinearForCausalLM.from_pretrained`` / ``save_pretrained`` are the usual entry points.
"""

from kimi_linear.hf import checkpoint, config_json, weight_names
from kimi_linear.hf.checkpoint import (
    MAX_NAMED_TENSORS,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    LoadPlan,
    NonFiniteWeightsWarning,
    check_output_dir,
    fill_weights_,
    load_weights_,
    plan_load,
    pretrained_config,
    save_pretrained,
)
from kimi_linear.hf.config_json import (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    IGNORED_KEYS,
    NOOP_KEYS,
    config_from_hf,
    config_to_hf,
    generation_config,
    read_config_json,
)
from kimi_linear.hf.weight_names import (
    release_state_dict,
    route_weight,
    stack_release_expert_keys,
    to_release_state_dict,
)

__all__ = [
    "CONFIG_NAME",
    "GENERATION_CONFIG_NAME",
    "IGNORED_KEYS",
    "MAX_NAMED_TENSORS",
    "NOOP_KEYS",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "LoadPlan",
    "NonFiniteWeightsWarning",
    "check_output_dir",
    "checkpoint",
    "config_from_hf",
    "config_json",
    "config_to_hf",
    "fill_weights_",
    "generation_config",
    "load_weights_",
    "plan_load",
    "pretrained_config",
    "read_config_json",
    "release_state_dict",
    "route_weight",
    "save_pretrained",
    "stack_release_expert_keys",
    "to_release_state_dict",
    "weight_names",
]
