"""R3's stage rewards (§"Stage-wise Reward"), for Tree-RL's per-stage GRPO.

V is the judge's score in [0, 1]. Reason stage: the blueprint text and the first image.
Reflect-refine stage: a reflection on an image scored V̂ (``v_prev``), then, unless it said the
stop phrase, a refined image scored V.
"""

from __future__ import annotations


def correction(v_prev: float, v_new: float | None, stop_phrase: bool) -> float:
    """The correction metric C_j:

        C = V − V̂                        if V̂ < 1   (reward measurable improvement)
        C = 1[reflection = stop phrase]   if V̂ = 1   (reward stopping on a perfect image)

    ``v_new`` is None when no refined image was made (the reflection stopped): the image is
    unchanged, V = V̂, so C = 0 when V̂ < 1.
    """
    if v_prev < 1.0:
        return (v_prev if v_new is None else v_new) - v_prev
    return 1.0 if stop_phrase else 0.0


def reflection_reward(
    v_prev: float, v_new: float | None, stop_phrase: bool, r_format: float
) -> float:
    """r_reflection = C + r_format."""
    return correction(v_prev, v_new, stop_phrase) + r_format


def refinement_reward(v_prev: float, v_new: float | None, stop_phrase: bool) -> float:
    """r_refinement = C (the image editor's reward)."""
    return correction(v_prev, v_new, stop_phrase)


def reason_text_reward(v: float, r_format: float) -> float:
    """Reason stage, text policy (the blueprint): r_text = V + r_format."""
    return v + r_format


def reason_image_reward(v: float) -> float:
    """Reason stage, image policy (the first draw): r_image = V."""
    return v
