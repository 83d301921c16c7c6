"""LoRA adapters (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022)
injected into a backbone through the ``peft`` library (optional extra: ``pip install tlmodules[lora]``).

The adapters are placed in the layer group of the layer they adapt, so freezing strategies and
layer-wise learning rates apply to them; the pretrained weights stay frozen.
"""

from __future__ import annotations

from collections.abc import Sequence

from tlmodules.backbones import Backbone, BackboneError
from tlmodules.errors import ConfigError


def default_targets(backbone: Backbone) -> list[str]:
    config = getattr(backbone.body, "config", None)
    model_type = getattr(config, "model_type", None)
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    if model_type in mapping:
        return list(mapping[model_type])
    raise BackboneError(
        f"no default LoRA target modules for a {type(backbone.body).__name__}; set lora_targets to the "
        "names of the linear layers to adapt (e.g. ['query', 'value'])"
    )


def apply_lora(
    backbone: Backbone, rank: int, alpha: float, dropout: float, targets: Sequence[str] | None = None
) -> None:
    """Inject LoRA adapters of rank ``rank`` into ``backbone.body`` in place; record them as adapters."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:
        raise ImportError("LoRA needs the 'peft' library: pip install 'tlmodules[lora]'") from err
    if rank <= 0:
        raise ConfigError(f"lora_rank must be positive, got {rank}")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets) if targets else default_targets(backbone),
    )
    before = {id(p): n for n, p in backbone.body.named_parameters()}
    inject_adapter_in_model(config, backbone.body)
    after = dict(backbone.body.named_parameters())
    renamed = {before[id(p)]: n for n, p in after.items() if id(p) in before}
    groups = [[renamed[n] for n in group] for group in backbone._group_names]
    group_of = {n: i for i, group in enumerate(groups) for n in group}
    adapters = [n for n, p in after.items() if id(p) not in before]
    if not adapters:
        raise BackboneError(f"LoRA targets {config.target_modules} matched no layer of the backbone")
    for name in adapters:
        layer = name.split(".lora_")[0]
        sibling = next((n for n in group_of if n.startswith(layer + ".base_layer.")), None)
        groups[group_of.get(sibling, len(groups) - 1)].append(name)
    backbone._group_names = groups
    backbone.adapter_names = set(adapters)
