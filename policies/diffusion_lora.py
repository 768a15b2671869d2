"""Diffusion LoRA policies: a peft LoRA on a pipeline's transformer (or UNet), saved in peft's
layout so servers load it at run time.

On disk (one directory per version, as the text LoRA policies)::

    adapter_model.safetensors   the LoRA tensors, peft key names (adapter name stripped)
    adapter_config.json         peft's LoraConfig (r, lora_alpha, target_modules, ...)
    atelier_policy.json         {"format": "atelier-diffusion-lora/1", "name", "version",
                                 "base_model", "parent", ...training metadata}

Nothing is unpickled: tensors come from safetensors, the config is JSON and only LoraConfig's
known fields are read. A file that is missing, corrupt, or whose tensors do not match the model
(another architecture, another rank) raises :class:`AdapterError` naming the problem.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
POLICY_FILE = "atelier_policy.json"
FORMAT = "atelier-diffusion-lora/1"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""The attention projections of SD3/Flux transformer blocks (Flow-GRPO's LoRA targets)."""


class AdapterError(ValueError):
    """A diffusion LoRA directory that cannot be loaded into this model."""


@dataclass(frozen=True)
class DiffusionLoRA:
    """What a LoRA directory says about itself."""

    path: Path
    name: str
    version: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``name@version``: what transitions sampled under this LoRA record."""
        return f"{self.name}@{self.version}"


def lora_config(
    r: int = 8, alpha: int = 16, targets: Sequence[str] = DEFAULT_TARGETS, dropout: float = 0.0
) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(targets),
        lora_dropout=dropout,
        init_lora_weights="gaussian",  # B = 0: the fresh policy equals the base model exactly
    )


def attach_lora(model: Any, config: Any, adapter_name: str = "default") -> list[Any]:
    """Add a trainable LoRA to ``model`` (a diffusers transformer/UNet) and return its
    parameters; everything else is frozen."""
    model.requires_grad_(False)
    model.add_adapter(config, adapter_name=adapter_name)
    model.set_adapter(adapter_name)
    params = [p for n, p in model.named_parameters() if "lora_" in n and adapter_name in n]
    for param in params:
        param.requires_grad_(True)
    return params


def save_lora(
    model: Any,
    directory: str | Path,
    *,
    name: str,
    version: str,
    adapter_name: str = "default",
    meta: dict[str, Any] | None = None,
) -> DiffusionLoRA:
    """Write ``model``'s LoRA ``adapter_name`` as a versioned policy directory."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = model.peft_config[adapter_name].to_dict()
    config["target_modules"] = sorted(config.get("target_modules") or [])
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    info = {"format": FORMAT, "name": name, "version": version, **(meta or {})}
    (path / POLICY_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return DiffusionLoRA(path, name, version, dict(meta or {}))


def read_lora(directory: str | Path) -> tuple[Any, dict[str, Any], DiffusionLoRA]:
    """(LoraConfig, tensors, description) of a LoRA directory; :class:`AdapterError` when any
    part is missing or unreadable."""
    from peft import LoraConfig
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory)
    if not path.is_dir():
        raise AdapterError(f"LoRA adapter path {str(path)!r} is not a directory")
    for needed in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / needed).is_file():
            raise AdapterError(f"{path}: {needed} is missing (not a peft LoRA directory)")
    try:
        raw = json.loads((path / ADAPTER_CONFIG).read_text())
        known = set(LoraConfig.__dataclass_fields__)
        config = LoraConfig(**{k: v for k, v in raw.items() if k in known and k != "peft_type"})
    except (ValueError, TypeError) as error:
        raise AdapterError(f"{path}/{ADAPTER_CONFIG} is not a valid LoRA config: {error}") from None
    try:
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(
            f"{path}/{ADAPTER_WEIGHTS} is not a readable safetensors file: {error}"
        ) from None
    meta: dict[str, Any] = {}
    if (path / POLICY_FILE).is_file():
        try:
            meta = json.loads((path / POLICY_FILE).read_text())
        except ValueError as error:
            raise AdapterError(f"{path}/{POLICY_FILE} is not JSON: {error}") from None
    info = DiffusionLoRA(
        path,
        str(meta.get("name", path.name)),
        str(meta.get("version", "0")),
        {k: v for k, v in meta.items() if k not in ("format", "name", "version")},
    )
    return config, tensors, info


def load_lora(model: Any, directory: str | Path, adapter_name: str = "default") -> DiffusionLoRA:
    """Load a LoRA directory into ``model`` as ``adapter_name`` and make it the active adapter.
    Every tensor must match a LoRA weight of the model in name and shape (else
    :class:`AdapterError`, and the model is left as it was)."""
    from peft.utils import set_peft_model_state_dict

    config, tensors, info = read_lora(directory)
    try:
        model.add_adapter(config, adapter_name=adapter_name)
    except ValueError as error:  # e.g. no module matches target_modules
        raise AdapterError(f"{info.path}: LoRA does not fit this model: {error}") from None
    try:
        expected = {n for n in _lora_keys(model, adapter_name)}
        given = set(tensors)
        if given != expected:
            missing, extra = sorted(expected - given), sorted(given - expected)
            raise AdapterError(
                f"{info.path}: LoRA tensors do not match this model "
                f"({len(missing)} missing, e.g. {missing[:2]}; {len(extra)} unexpected, "
                f"e.g. {extra[:2]})"
            )
        try:
            set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)
        except RuntimeError as error:  # shape mismatch (another rank or width)
            raise AdapterError(f"{info.path}: LoRA tensor shapes do not match: {error}") from None
    except AdapterError:
        model.delete_adapters(adapter_name)
        raise
    model.set_adapter(adapter_name)
    return info


def unload_lora(model: Any, adapter_name: str = "default") -> None:
    model.delete_adapters(adapter_name)


def _lora_keys(model: Any, adapter_name: str) -> list[str]:
    from peft.utils import get_peft_model_state_dict

    return list(get_peft_model_state_dict(model, adapter_name=adapter_name))
