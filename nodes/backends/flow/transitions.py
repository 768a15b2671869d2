"""What a traced flow-matching sample returns, for training (Flow-GRPO) — torch-free: the
image with its :class:`~storage.transitions.DiffusionTransition` records, and their wire form.
"""

from __future__ import annotations

from dataclasses import dataclass

from storage.transitions import LATENTS_KEY, NEXT_LATENTS_KEY, DiffusionTransition

__all__ = [
    "LATENTS_KEY",
    "NEXT_LATENTS_KEY",
    "DiffusionTransition",
    "TracedImage",
    "transition_from_json",
    "transition_to_json",
]


@dataclass(frozen=True)
class TracedImage:
    """An image with the stochastic transitions that produced it."""

    image: object
    """A PIL image."""
    transitions: tuple[DiffusionTransition, ...]


def transition_to_json(transition: DiffusionTransition) -> dict[str, object]:
    """The wire form (the image server's ``return_transitions``): the fields, with the latents
    as base64 safetensors bytes under ``latents_b64``."""
    import base64
    from dataclasses import asdict

    data = asdict(transition)
    data["latents_b64"] = base64.b64encode(data.pop("latents")).decode("ascii")
    return data


def transition_from_json(data: dict[str, object]) -> DiffusionTransition:
    import base64
    from dataclasses import fields

    names = {f.name for f in fields(DiffusionTransition)} - {"latents"}
    latents = base64.b64decode(str(data["latents_b64"]), validate=True)
    return DiffusionTransition(latents=latents, **{k: data[k] for k in names if k in data})  # type: ignore[arg-type]
