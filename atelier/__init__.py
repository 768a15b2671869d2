"""Atelier: adaptive image generation by reasoning — one import for users.

    import atelier

    store = atelier.TrajectoryStore("sqlite:///atelier.db")
    graph = atelier.AtelierGraph(atelier.ReasonerState, context_schema=atelier.ReasonerContext)

A thin facade over the five packages (``storage`` ← ``policies`` ← ``nodes`` ← ``agent_graph``
← ``training``), which never import it. Names load on first use (PEP 562), so ``import
atelier`` and the ``atelier`` command stay light: torch, LangGraph and SQLAlchemy load only
when a name that needs them is touched.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    # build a graph: the state, its context, the nodes
    "AtelierGraph": "agent_graph.graph",
    "build_reasoner": "agent_graph.graph",
    "reasoner_graph": "agent_graph.graph",
    "ReasonerState": "nodes.state",
    "Task": "nodes.state",
    "Budget": "nodes.state",
    "Mode": "nodes.state",
    "StopReason": "nodes.state",
    "ReasonerContext": "nodes.context",
    "GraphSettings": "nodes.context",
    "Backends": "nodes.context",
    "plan": "nodes.plan",
    "draw": "nodes.draw",
    "reflect": "nodes.reflect",
    "refine": "nodes.refine",
    "next_edit": "nodes.refine",
    "decompose": "nodes.decompose",
    "stop": "nodes.stop",
    # run, record, resume
    "Runner": "agent_graph.runner",
    "make_group_tasks": "agent_graph.runner",
    "TrajectoryResult": "agent_graph.runner",
    "RolloutResult": "agent_graph.rollout",
    "print_trajectory": "agent_graph.show",
    "rollout": "agent_graph.rollout",
    "resume_run": "agent_graph.rollout",
    "shapeworld_context": "agent_graph.presets",
    "shapeworld_tasks": "agent_graph.presets",
    "config_context": "agent_graph.presets",
    "freeze_startup_heap": "agent_graph.heap",
    # read the store
    "TrajectoryStore": "storage.store",
    "SQLRecorder": "storage.recorder",
    # train node policies
    "GRPOConfig": "training.decisions.trainer",
    "GRPOTrainer": "training.decisions.trainer",
    "read_decision_groups": "training.decisions.groups:read_groups",
    "TrainResult": "training.result",
    "save_version": "training.versions",
    "LearnedModePolicy": "policies.mode",
    "LearnedStopPolicy": "policies.stop",
    "load_policy": "policies.weights",
    # text and vision-language node policies (plan, reflect, decompose)
    "LoRAConfig": "training.text.config",
    "LoRATrainer": "training.text.trainer",
    "read_node_groups": "training.text.groups",
    "store_text_rewards": "training.text.rewards",
    "read_sft_examples": "training.text.sft",
    "train_sft": "training.text.sft",
}

__all__ = [
    "AtelierGraph",
    "Backends",
    "Budget",
    "GRPOConfig",
    "GRPOTrainer",
    "GraphSettings",
    "LearnedModePolicy",
    "LearnedStopPolicy",
    "LoRAConfig",
    "LoRATrainer",
    "Mode",
    "ReasonerContext",
    "ReasonerState",
    "RolloutResult",
    "Runner",
    "SQLRecorder",
    "StopReason",
    "Task",
    "TrainResult",
    "TrajectoryResult",
    "TrajectoryStore",
    "build_reasoner",
    "config_context",
    "decompose",
    "draw",
    "freeze_startup_heap",
    "load_policy",
    "make_group_tasks",
    "next_edit",
    "plan",
    "print_trajectory",
    "read_decision_groups",
    "read_node_groups",
    "read_sft_examples",
    "reasoner_graph",
    "refine",
    "reflect",
    "resume_run",
    "rollout",
    "save_version",
    "shapeworld_context",
    "shapeworld_tasks",
    "stop",
    "store_text_rewards",
    "train_sft",
]


def __getattr__(name: str) -> Any:
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module 'atelier' has no attribute {name!r}")
    module, _, attribute = where.partition(":")  # "module:attr" when the names differ
    value = getattr(import_module(module), attribute or name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # type checkers and IDEs see the real names
    from agent_graph.graph import AtelierGraph, build_reasoner, reasoner_graph
    from agent_graph.heap import freeze_startup_heap
    from agent_graph.presets import config_context, shapeworld_context, shapeworld_tasks
    from agent_graph.rollout import RolloutResult, resume_run, rollout
    from agent_graph.runner import Runner, TrajectoryResult, make_group_tasks
    from agent_graph.show import print_trajectory
    from nodes.context import Backends, GraphSettings, ReasonerContext
    from nodes.decompose import decompose
    from nodes.draw import draw
    from nodes.plan import plan
    from nodes.refine import next_edit, refine
    from nodes.reflect import reflect
    from nodes.state import Budget, Mode, ReasonerState, StopReason, Task
    from nodes.stop import stop
    from policies.mode import LearnedModePolicy
    from policies.stop import LearnedStopPolicy
    from policies.weights import load_policy
    from storage.recorder import SQLRecorder
    from storage.store import TrajectoryStore
    from training.decisions.groups import read_groups as read_decision_groups
    from training.decisions.trainer import GRPOConfig, GRPOTrainer
    from training.result import TrainResult
    from training.text.config import LoRAConfig
    from training.text.groups import read_node_groups
    from training.text.rewards import store_text_rewards
    from training.text.sft import read_sft_examples, train_sft
    from training.text.trainer import LoRATrainer
    from training.versions import save_version
