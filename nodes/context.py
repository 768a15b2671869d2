"""What a graph run is given: backends per role, the image store, the policies, settings.

Passed as LangGraph's runtime context (``graph.ainvoke(state, context=...)``), so nothing is
global: two runs in one process can use different servers, stores and policy versions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nodes.backends.base import ChatModel, ImageEditor, ImageGenerator, Judge, SamplingParams
from policies.base import ModePolicy, StopPolicy
from storage.images import ImageStore, MemoryImageStore


@dataclass(frozen=True)
class Backends:
    """One backend per role; one object may serve several roles."""

    planner: ChatModel
    reflector: ChatModel
    decomposer: ChatModel
    generator: ImageGenerator
    editor: ImageEditor
    judge: Judge | None = None
    """Scores images (V in [0, 1]); recorded, never used for routing by the built-in nodes."""


@dataclass(frozen=True)
class GraphSettings:
    width: int = 256
    """Width of generated images, in pixels."""
    height: int = 256
    """Height of generated images, in pixels."""
    steps: int | None = None
    """Denoising steps for generators that take them; None = the server's default."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """Sampling for the text roles; the seed is replaced per call from the trajectory's seed."""
    score_images: bool = True
    """Judge every image against the task prompt (needed for R3's stage rewards C_j)."""


@dataclass(frozen=True)
class ReasonerContext:
    backends: Backends
    mode_policy: ModePolicy
    stop_policy: StopPolicy
    images: ImageStore = field(default_factory=MemoryImageStore)
    settings: GraphSettings = field(default_factory=GraphSettings)
    recorder: object | None = None
    """A :class:`agent_graph.recording.Recorder`; None records nothing."""
