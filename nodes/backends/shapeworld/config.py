"""Every ShapeWorld knob in one typed place: drawing, detection, and each component's error model.

Defaults are calibrated so the three modes matter on ``fixed_prompt_set(24, seed=0)``: direct
generation is nearly always right on one object and mostly wrong on multi-group counts,
reflection fixes middling prompts, decomposition pays on the hardest ones.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ShapeWorldConfig(BaseModel):
    """ShapeWorld's settings; rates are probabilities per image, edit or reply."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    # Drawing (sizes are for a 256-pixel canvas and scale with the shorter side).
    size_min: int = Field(20, ge=12)
    """Smallest object side in a fresh scene, in pixels (crowded areas may shrink it a little)."""
    size_max: int = Field(56, ge=12)
    """Largest object side in pixels (a lone object is drawn large)."""
    gap: int = Field(6, ge=2)
    """Minimum free pixels between objects, so same-coloured neighbours never merge."""

    # Detection and judging.
    colour_tolerance: float = Field(100.0, gt=0)
    """Largest RGB distance at which a pixel still counts as a palette colour."""
    min_area: int = Field(40, ge=1)
    """Smallest component (pixels, on a 256 canvas) reported as an object; less is noise."""
    position_threshold: float = Field(0.1, ge=0)
    """GenEval's margin: a relation needs centres apart by more than this x the objects' sizes."""

    # Generator error model: errors per image ~ Poisson(hazard).
    base_hazard: float = Field(0.03, ge=0)
    """Expected errors when drawing the simplest prompt (complexity 1)."""
    hazard_per_complexity: float = Field(0.4, ge=0)
    """Extra expected errors per unit of prompt complexity above 1."""
    hazard_curvature: float = Field(0.03, ge=0)
    """Extra expected errors per squared unit of complexity above 1 (compositional collapse)."""
    blueprint_hazard_scale: float = Field(0.85, ge=0)
    """Hazard multiplier when the prompt carries a planner's layout (R3: reasoning helps a bit)."""
    miscount_weight: float = Field(3.0, ge=0)
    """Relative frequency of drawing a group with the wrong count."""
    binding_weight: float = Field(2.0, ge=0)
    """Relative frequency of swapping the colours of two coloured groups."""
    position_weight: float = Field(2.0, ge=0)
    """Relative frequency of drawing a relation the wrong way round."""
    missing_weight: float = Field(1.0, ge=0)
    """Relative frequency of leaving a whole group out (scenes of two or more groups)."""
    wrong_colour_weight: float = Field(1.0, ge=0)
    """Relative frequency of drawing a coloured group in an unrequested colour."""
    size_weight: float = Field(1.0, ge=0)
    """Relative frequency of drawing a big or small group at the ordinary size."""
    big_miscount_rate: float = Field(0.3, ge=0, le=1)
    """Chance a miscount of a group of 4 or more is off by two rather than one."""

    # Editor error model.
    edit_failure_rate: float = Field(0.08, ge=0, le=1)
    """Chance an edit leaves the image unchanged."""
    edit_failure_per_object: float = Field(0.04, ge=0, le=1)
    """Extra failure chance per object the edit touches beyond the first."""
    edit_partial_rate: float = Field(0.1, ge=0, le=1)
    """Chance an edit touching several objects touches one fewer."""
    edit_failure_per_scene_object: float = Field(0.01, ge=0, le=1)
    """Extra failure chance per object already in the image: busy images are harder to edit."""
    recolour_failure_rate: float = Field(0.15, ge=0, le=1)
    """Extra failure chance of a recolour: changing what exists is harder than adding."""
    move_failure_rate: float = Field(0.3, ge=0, le=1)
    """Extra failure chance of a move: relocating objects is the hardest edit."""

    # Decomposer.
    decomposer_merge_rate: float = Field(0.0, ge=0, le=1)
    """Chance a decomposition draws its first two groups in one step (one image fewer, at the
    generator's error rate for the larger scene); 0: always one group per step."""

    # Reflector noise.
    reflector_miss_rate: float = Field(0.04, ge=0, le=1)
    """Chance the reflector overlooks every discrepancy and says the stop phrase."""
    reflector_false_alarm_rate: float = Field(0.02, ge=0, le=1)
    """Chance the reflector asks for an edit on an image that already matches."""
    reflector_off_rate: float = Field(0.05, ge=0, le=1)
    """Chance the instruction is slightly off (count, colour or direction wrong)."""
    reflector_confusion_rate: float = Field(0.1, ge=0, le=1)
    """Extra off chance per discrepancy beyond the first: a messy image confuses the reflector."""
    reflector_count_noise: float = Field(0.04, ge=0, le=1)
    """Chance per object beyond three in a group that the reflector miscounts it by one."""
    reflector_malformed_rate: float = Field(0.03, ge=0, le=1)
    """Chance the reply breaks R3's format (missing </think>, two instructions, ...)."""

    @classmethod
    def noiseless(cls, **overrides: object) -> ShapeWorldConfig:
        """A config whose generator, editor and reflector never err (for tests and ablations)."""
        zero = dict(
            base_hazard=0.0,
            hazard_per_complexity=0.0,
            hazard_curvature=0.0,
            edit_failure_rate=0.0,
            edit_failure_per_object=0.0,
            edit_partial_rate=0.0,
            edit_failure_per_scene_object=0.0,
            recolour_failure_rate=0.0,
            move_failure_rate=0.0,
            reflector_miss_rate=0.0,
            reflector_false_alarm_rate=0.0,
            reflector_off_rate=0.0,
            reflector_confusion_rate=0.0,
            reflector_count_noise=0.0,
            reflector_malformed_rate=0.0,
        )
        return cls(**{**zero, **overrides})
