"""Backends per role from config files: the shipped examples, and clear errors for bad ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_graph.runner import Runner
from nodes.backends.base import ChatMessage, ChatRequest, ImageRequest, SamplingParams
from nodes.backends.clients.omni_client import OmniImageClient
from nodes.backends.clients.openai_client import OpenAIChatClient
from nodes.backends.config import (
    ROLES,
    ConfigError,
    build_backends,
    load_backends,
    load_config,
    parse_config,
)
from nodes.backends.vlm_judge import VLMJudge
from nodes.context import Backends, ReasonerContext
from nodes.state import Task
from policies.simple import FixedModePolicy, FollowReflectionStopPolicy

pytest_plugins = ("tests.tiny_models",)  # the session fixtures: tiny models and servers

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
ROLE_TABLE = {
    "planner": "a",
    "reflector": "a",
    "decomposer": "a",
    "generator": "b",
    "editor": "b",
}


def config(backends: dict, roles: dict | None = None) -> dict:
    return {"backends": backends, "roles": ROLE_TABLE if roles is None else roles}


OPENAI = {"kind": "openai", "urls": ["http://127.0.0.1:9"]}
OMNI = {"kind": "omni", "urls": ["http://127.0.0.1:9"]}


def test_every_example_config_validates_and_builds_without_connecting(monkeypatch):
    monkeypatch.setenv("ATELIER_SERVER_TOKEN", "t0ken")
    names = sorted(p.name for p in CONFIGS.glob("*.toml"))
    assert {"shapeworld.toml", "tiny-models.toml"} <= set(names)
    for path in CONFIGS.glob("*.toml"):
        parsed = load_config(path, check_paths=False)  # model folders: tests/test_tiny_path*
        assert set(parsed.roles) >= {"planner", "reflector", "decomposer", "generator", "editor"}
        if any(spec.kind.startswith("inprocess") for spec in parsed.backends.values()):
            continue  # built from real model folders in the test below
        backends = build_backends(parsed)
        assert set(backends) == set(ROLES)
        Backends(**backends)  # the graph's context accepts them


def test_remote_configs_share_one_pool_per_backend(monkeypatch):
    monkeypatch.setenv("ATELIER_SERVER_TOKEN", "t0ken")
    backends = load_backends(CONFIGS / "qwen-vl-vllm-omni.toml")
    planner, reflector = backends["planner"], backends["reflector"]
    assert planner is reflector  # alike roles share one object, as they share the servers
    client = planner.inner  # the config's sampling fields around the HTTP client
    assert isinstance(client, OpenAIChatClient)
    assert planner.overrides["top_k"] == -1 and planner.overrides["repetition_penalty"] == 1.0
    assert planner.pool.urls == ["http://gpu-node-1:8000", "http://gpu-node-1:8010"]
    assert planner.pool.token == "t0ken" and planner.model == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert isinstance(backends["generator"], OmniImageClient)
    assert backends["generator"] is not backends["editor"]
    assert backends["generator"].extra_body == {"true_cfg_scale": 4.0}
    judge = backends["judge"]
    assert isinstance(judge, VLMJudge) and judge.model is client  # scoring samples nothing


def test_role_adapters_select_a_lora_on_the_shared_servers():
    parsed = parse_config(
        config(
            {"a": OPENAI, "b": OMNI},
            {**ROLE_TABLE, "reflector": {"backend": "a", "adapter": "reflect-v3"}},
        )
    )
    backends = build_backends(parsed)
    assert backends["reflector"].model_id == "reflect-v3"
    assert backends["reflector"].pool is backends["planner"].pool
    assert backends["judge"] is None


def test_only_traced_image_backends_are_traced_models_sized_or_not():
    """A backend is a ``TracedImageModel`` exactly when it records transitions: the traced
    Omni client, and the size wrapper around it (which applies its size to traced draws too);
    never a plain client, wrapped or not."""
    from nodes.backends.base import TracedImageModel
    from nodes.backends.overrides import SizedTracedImageModel

    sized = {**OMNI, "size": "48x32", "steps": 3}
    parsed = parse_config(
        config(
            {"a": OPENAI, "b": sized, "c": {**sized, "traced": True}},
            {**ROLE_TABLE, "editor": "c"},
        )
    )
    backends = build_backends(parsed)
    generator, editor = backends["generator"], backends["editor"]
    assert isinstance(generator.inner, OmniImageClient)
    assert not isinstance(generator, TracedImageModel)
    assert not isinstance(generator.inner, TracedImageModel)
    assert isinstance(editor, SizedTracedImageModel) and isinstance(editor, TracedImageModel)
    assert isinstance(editor.inner, TracedImageModel) and editor.size == (48, 32)


async def test_shapeworld_config_runs_the_graph():
    backends = load_backends(CONFIGS / "shapeworld.toml")
    context = ReasonerContext(
        backends=Backends(**backends),
        mode_policy=FixedModePolicy("reflect"),
        stop_policy=FollowReflectionStopPolicy(),
    )
    result = await Runner(context).run_one(Task(prompt="two red circles", seed=3))
    assert result.status == "succeeded" and result.state.judgement is not None


def test_shapeworld_options_are_checked():
    parsed = parse_config(
        config(
            {"a": {"kind": "shapeworld", "options": {"gapp": 3}}},
            {role: "a" for role in ROLE_TABLE},
        )
    )
    with pytest.raises(ConfigError, match=r"backends\.a\.options\.gapp: Extra inputs"):
        build_backends(parsed)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (config({"a": {**OPENAI, "urlz": []}, "b": OMNI}), r"backends\.a\.urlz: Extra inputs"),
        (config({"a": {**OPENAI, "urls": []}, "b": OMNI}), r"backends\.a\.urls: List should"),
        (config({"a": {"kind": "vllm"}, "b": OMNI}), r"backends\.a: Input tag 'vllm'"),
        (config({"a": OPENAI, "b": OMNI}, {"planner": "a"}), "roles: missing reflector"),
        (
            config({"a": OPENAI, "b": OMNI}, {**ROLE_TABLE, "editor": "c"}),
            r"roles\.editor: no backend named 'c' \(known: a, b\)",
        ),
        (
            config({"a": OPENAI, "b": OMNI}, {**ROLE_TABLE, "generator": "a"}),
            r"roles\.generator: backend 'a' is of kind 'openai'",
        ),
        (
            config({"a": OPENAI, "b": OMNI}, {**ROLE_TABLE, "painter": "b"}),
            r"roles\.painter: Input should be 'planner'",
        ),
        (
            config(
                {"a": OPENAI, "b": OMNI, "w": {"kind": "shapeworld"}},
                {**ROLE_TABLE, "editor": {"backend": "w", "adapter": "x"}},
            ),
            r"roles\.editor: a diffusion LoRA adapter needs an omni backend or an "
            r"inprocess-image backend with traced = true .* not 'w' of kind 'shapeworld'",
        ),
        ({"backends": {"a": OPENAI}, "roles": ROLE_TABLE, "extra": 1}, r"extra: Extra inputs"),
        (
            config({"a": {**OPENAI, "model": "${NOT_SET_ANYWHERE}"}, "b": OMNI}),
            r"backends\.a\.model: environment variable NOT_SET_ANYWHERE is not set",
        ),
        (config({"a": OPENAI, "b": {"kind": "inprocess-image"}}), r"backends\.b: set model"),
        (
            config({"a": OPENAI, "b": {"kind": "inprocess-image", "model": "m", "lora": "l"}}),
            r"backends\.b: lora is loaded by the traced sampler",
        ),
        (
            config(
                {
                    "a": OPENAI,
                    "b": {"kind": "inprocess-image", "edit_model": "e", "traced": True},
                }
            ),
            r"backends\.b: traced sampling needs model",
        ),
        (
            {**config({"a": OPENAI, "b": OMNI}), "rewards": {"source": "clip"}},
            r"rewards\.source: Input should be 'checker', 'judge' or 'gvu'",
        ),
        (
            {**config({"a": OPENAI, "b": OMNI}), "rewards": {"source": "gvu", "backend": "c"}},
            r"rewards\.backend: no backend named 'c' \(known: a, b\)",
        ),
        (
            {**config({"a": OPENAI, "b": OMNI}), "rewards": {"source": "gvu", "backend": "b"}},
            r"rewards\.backend: backend 'b' is of kind 'omni'; the scoring VLM needs",
        ),
        (
            {**config({"a": OPENAI, "b": OMNI}), "rewards": {"source": "judge"}},
            r"rewards\.source: 'judge' needs a VLM: set rewards\.backend",
        ),
        (
            {**config({"a": OPENAI, "b": OMNI}), "rewards": {"top_logprobs": -1}},
            r"rewards\.top_logprobs: Input should be greater than or equal to 0",
        ),
        (
            {**config({"a": OPENAI, "b": OMNI}), "rewards": {"sorce": "gvu"}},
            r"rewards\.sorce: Extra inputs",
        ),
    ],
)
def test_bad_configs_name_the_bad_key(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(data, source="my.toml")


def test_file_errors_are_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[backends\nkind=")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    as_json = tmp_path / "c.json"
    as_json.write_text(
        '{"backends": {"w": {"kind": "shapeworld"}}, "roles": {"planner": "w", "reflector": "w",'
        ' "decomposer": "w", "generator": "w", "editor": "w"}}'
    )
    assert load_config(as_json).role("planner").backend == "w"


def test_env_defaults_and_relative_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("ATELIER_TINY_MODELS", raising=False)
    parsed = load_config(CONFIGS / "tiny-models.toml", check_paths=False)
    assert parsed.backends["vlm"].model == "/tmp/atelier-tiny/vlm"
    path = tmp_path / "rel.toml"
    path.write_text(
        '[backends.m]\nkind = "inprocess-lm"\nmodel = "models/vlm"\n'
        '[backends.p]\nkind = "inprocess-image"\nmodel = "models/sd"\n'
        '[roles]\nplanner = "m"\nreflector = "m"\ndecomposer = "m"\n'
        'generator = "p"\neditor = "p"\n'
    )
    parsed = load_config(path, check_paths=False)
    assert parsed.backends["m"].model == str(tmp_path / "models" / "vlm")


async def test_tiny_models_config_builds_in_process_backends(tiny_models, monkeypatch):
    monkeypatch.setenv("ATELIER_TINY_MODELS", str(tiny_models.root))
    backends = load_backends(CONFIGS / "tiny-models.toml")
    planner = backends["planner"]
    assert planner is backends["reflector"] and isinstance(backends["judge"], VLMJudge)
    completion = await planner.chat(
        ChatRequest(
            messages=(ChatMessage("user", "plan a red circle"),),
            sampling=SamplingParams(max_tokens=3, seed=0),
        )
    )
    # The config's sampling (max_tokens = 32) replaces what the request asked for.
    assert len(completion.token_ids) == len(completion.logprobs) == 32
    image = await backends["generator"].generate(ImageRequest("a red circle", 32, 32, seed=1))
    assert image.size == (64, 64)  # the config's size, whatever the graph asks
    verdict = await backends["judge"].judge(image, "a red circle")
    assert 0.0 <= verdict.score <= 1.0
    planner.service.close()
    backends["generator"].service.close()


async def test_traced_image_backends_from_config(tiny_sd3):
    from nodes.backends.base import TracedImageModel
    from nodes.backends.clients.omni_client import TracedOmniImageClient
    from nodes.backends.engines.flow_image import FlowImageModel

    parsed = parse_config(
        config(
            {
                "a": {"kind": "shapeworld"},
                "b": {
                    "kind": "inprocess-image",
                    "model": str(tiny_sd3),
                    "traced": True,
                    "steps": 3,
                    "device": "cpu",
                },
                "c": {**OMNI, "traced": True},
            },
            {**ROLE_TABLE, "editor": "c"},
        ),
        source="flow.toml",
    )
    backends = build_backends(parsed)
    generator, editor = backends["generator"], backends["editor"]
    assert isinstance(generator, FlowImageModel) and isinstance(editor, TracedOmniImageClient)
    assert isinstance(generator, TracedImageModel) and isinstance(editor, TracedImageModel)
    traced = await generator.generate_traced(ImageRequest("a red circle", 32, 32, seed=3))
    assert traced.image.size == (32, 32) and len(traced.transitions) >= 1
    generator.close()


def test_the_rewards_table_builds_the_judge_and_the_scoring_vlm_once():
    from nodes.backends.config import RewardsSpec, build_reward_backends

    roles = {**ROLE_TABLE, "judge": {"backend": "a", "adapter": "judge-v2"}}
    other = {**OPENAI, "urls": ["http://127.0.0.1:10"]}
    # No table: the judge role only; the default source is the stored judge score.
    parsed = parse_config(config({"a": OPENAI, "b": OMNI}, roles))
    assert parsed.rewards is None and RewardsSpec().source == "checker"
    judge, model = build_reward_backends(parsed)
    assert isinstance(judge, VLMJudge) and model is None
    assert judge.model.model_id.endswith("judge-v2")  # with the role's adapter
    # The table's backend is built once, shared with the judge when they name the same one.
    shared = parse_config(
        {**config({"a": OPENAI, "b": OMNI}, roles), "rewards": {"source": "gvu", "backend": "a"}}
    )
    judge, model = build_reward_backends(shared)
    assert isinstance(model, OpenAIChatClient) and judge.model.pool is model.pool
    table = {"source": "judge", "backend": "c", "top_logprobs": 5, "instruction": "Say it."}
    apart = parse_config({**config({"a": OPENAI, "b": OMNI, "c": other}), "rewards": table})
    judge, model = build_reward_backends(apart)
    assert judge is None and model.pool.urls == ["http://127.0.0.1:10"]
    assert apart.rewards == RewardsSpec(**table)
