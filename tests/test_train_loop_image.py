"""Diffusion LoRA versions in service and on-policy Flow-GRPO through a backends file (issue 15,
items 2, 4 and 5).

Real parts: a tiny random-weight SD3 (32×32, 2 denoising steps) sampled with the Flow-GRPO SDE,
ShapeWorld planning and judging. A backends file's generator names a registered ``draw@1``:
on an ``omni`` backend over two ``atelier serve image`` replicas it is loaded on both before the
rollout and every recorded draw names it. The loop (``training.online.online_iterations`` with
:class:`~atelier.cli.train_loop_image.FlowLoopPolicy`, driven in Python) trains the draw LoRA on
a traced ``inprocess-image`` backend for two iterations: the second samples from the version
the first trained, and the trainer's recomputation matches what the sampler recorded (ratio 1
at the first step of each iteration); a refine loop does the same for the editor's LoRA.
Stopped after one iteration and resumed, the loop makes the same versions (the same weights),
each once, and stores no reward row twice. A file the loop cannot deploy through is refused in
one line."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from nodes.backends.config import ConfigError, configure_backends, load_config, parse_config
from storage.store import TrajectoryStore

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

pytest_plugins = ("tests.tiny_models",)
pytestmark = [pytest.mark.models, pytest.mark.slow]

PROMPTS = ("two red circles left of a blue square", "three green triangles above a yellow star")
WORLD_ROLES = 'planner = "world"\nreflector = "world"\ndecomposer = "world"\njudge = "world"\n'
FLOW = ("--flow-r", "4", "--flow-alpha", "8", "--flow-lr", "0.01", "--flow-minibatch", "4")


def _draw_lora(sd3: Path, directory: Path, version: str = "1") -> Path:
    """A draw LoRA with non-zero weights (it changes the images), saved as ``draw@version``."""
    from nodes.backends.engines.flow_image import load_pipeline
    from policies.diffusion_lora import attach_lora, lora_config, save_lora

    transformer = load_pipeline(sd3).transformer
    params = attach_lora(transformer, lora_config(4, 8))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for param in params:
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return save_lora(transformer, directory, name="draw", version=version).path


def _draws(store: TrajectoryStore, run_id: str) -> list[Any]:
    ids = [t.id for t in store.trajectories(run=run_id, limit=None)]
    return [s for steps in store.steps_many(ids).values() for s in steps if s.node == "draw"]


def _transition_loras(store: TrajectoryStore, run_id: str) -> Counter[str | None]:
    from storage.diffusion import load_transitions

    ids = [t.id for t in store.trajectories(run=run_id, limit=None)]
    return Counter(s.transition.lora for s in load_transitions(store.db, trajectory_ids=ids))


# --- a version in service ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def replicas(tiny_sd3: Path) -> Any:
    """Two ``atelier serve image`` replicas of the tiny SD3: (servers, services)."""
    from nodes.backends.engines.image_inprocess import ImageService
    from nodes.backends.servers.http_common import BackgroundServer
    from nodes.backends.servers.image_server import create_image_app

    services = [
        ImageService.from_pretrained(tiny_sd3, name="tiny-sd3", default_steps=2, torch_threads=1)
        for _ in range(2)
    ]
    servers = [BackgroundServer(create_image_app(s)).start() for s in services]
    yield servers, services
    for server, service in zip(servers, services, strict=True):
        server.stop()
        service.close()


def test_a_registered_draw_version_is_loaded_on_every_replica_and_named_by_each_draw(
    replicas: Any, tiny_sd3: Path, tmp_path: Path
) -> None:
    from agent_graph.rollout import rollout
    from agent_graph.runner import make_group_tasks
    from nodes.state import Budget

    servers, services = replicas
    lora = _draw_lora(tiny_sd3, tmp_path / "draw-1")
    store = TrajectoryStore(f"sqlite:///{tmp_path / 'runs.db'}")
    store.register_policy_version("draw", "1", path=str(lora), metadata={"kind": "diffusion-lora"})
    urls = ", ".join(f'"{s.url}"' for s in servers)
    config = tmp_path / "served.toml"
    config.write_text(
        '[backends.world]\nkind = "shapeworld"\n\n'
        f'[backends.painter]\nkind = "omni"\nurls = [{urls}]\ntraced = true\nsteps = 2\n'
        'size = "32x32"\ntimeout_s = 60\n\n'
        f'[roles]\n{WORLD_ROLES}generator = {{ backend = "painter", adapter = "draw@1" }}\n'
        'editor = "world"\n'
    )
    tasks = make_group_tasks(list(PROMPTS), 2, 0)
    result = asyncio.run(
        rollout(store, tasks, backends_config=config, mode="direct", budget=Budget(max_rounds=1))
    )
    for service in services:  # loaded on both replicas, from the registered directory
        assert service.engine.adapters == {"draw@1": str(lora)}
    assert store.run(result.run_id).config["adapters"] == {"generator": "draw@1"}
    draws = _draws(store, result.run_id)
    assert len(draws) == 4 and all(step.models == ["draw@1"] for step in draws)
    assert _transition_loras(store, result.run_id) == Counter({"draw@1": 4})

    # vLLM-Omni (adapter_mode = "request"): nothing is loaded; each request names the directory.
    per_request = tmp_path / "omni.toml"
    per_request.write_text(
        config.read_text().replace("traced = true", 'adapter_mode = "request"')
        .replace(urls, '"http://127.0.0.1:9"')  # nothing listens: a load would fail
    )  # fmt: skip
    backends = configure_backends(per_request, store)
    asyncio.run(backends.load_adapters())
    generator = backends.roles["generator"].inner
    assert generator.lora.payload() == {"name": "draw@1", "local_path": str(lora), "scale": 1.0}
    assert generator.model_id == "draw@1"


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ('kind = "shapeworld"', "not 'painter' of kind 'shapeworld'"),
        ('kind = "inprocess-image"\nmodel = "{sd3}"', "not 'painter' of kind 'inprocess-image'"),
        (
            'kind = "inprocess-image"\nmodel = "{sd3}"\ntraced = true\nlora = "{lora}"',
            "backend 'painter' loads its own lora",
        ),
    ],
)
def test_an_adapter_on_an_image_role_of_a_backend_that_cannot_take_one_is_one_line(
    tiny_sd3: Path, tmp_path: Path, backend: str, message: str
) -> None:
    config = tmp_path / "bad.toml"
    spec = backend.format(sd3=tiny_sd3, lora=tmp_path)
    config.write_text(
        f'[backends.world]\nkind = "shapeworld"\n\n[backends.painter]\n{spec}\n\n'
        f'[roles]\n{WORLD_ROLES}generator = {{ backend = "painter", adapter = "draw@1" }}\n'
        'editor = "world"\n'
    )
    with pytest.raises(ConfigError, match=message) as error:
        load_config(config)
    assert "roles.generator" in str(error.value) and "\n" not in str(error.value)


def test_a_version_that_is_not_the_diffusion_lora_it_claims_is_refused(
    tiny_sd3: Path, tmp_path: Path
) -> None:
    """The registry's name must be the one the LoRA's own file holds (the transitions name the
    version they were sampled by), and an image role takes no text adapter."""
    lora = _draw_lora(tiny_sd3, tmp_path / "draw-1")
    text = tmp_path / "reflect-2"
    text.mkdir()
    (text / "adapter_config.json").write_text("{}")
    store = TrajectoryStore(f"sqlite:///{tmp_path / 'runs.db'}")
    store.register_policy_version("draw", "2", path=str(lora))
    for adapter, message in [
        ("draw@2", r"holds draw@1, not the registered draw@2"),
        (str(text), "holds a text/VLM LoRA adapter, not a diffusion LoRA"),
    ]:
        config = tmp_path / "bad.toml"
        config.write_text(
            '[backends.world]\nkind = "shapeworld"\n\n[backends.painter]\nkind = "omni"\n'
            'urls = ["http://127.0.0.1:9"]\ntraced = true\n\n'
            f'[roles]\n{WORLD_ROLES}generator = {{ backend = "painter", adapter = "{adapter}" }}\n'
            'editor = "world"\n'
        )
        with pytest.raises(ConfigError, match=message):
            configure_backends(config, store)
    # A directory the store does not register is named by its own file.
    config.write_text(config.read_text().replace(str(text), str(lora)))
    fresh = TrajectoryStore(f"sqlite:///{tmp_path / 'empty.db'}")
    assert configure_backends(config, fresh).versions.adapters["generator"].label == "draw@1"


def test_image_roles_on_one_loaded_adapter_must_name_the_same_one() -> None:
    """A traced server (and an in-process model) applies its one loaded LoRA to every request:
    an editor on the generator's backend would be sampled by draw@1 without naming it."""
    from nodes.backends.config import with_role_adapters

    world = {"kind": "shapeworld"}
    painter = {"kind": "omni", "urls": ["http://127.0.0.1:9"], "traced": True}
    roles = {r: "world" for r in ("planner", "reflector", "decomposer", "judge")}
    shared = {**roles, "generator": "painter", "editor": "painter"}
    data = {"backends": {"world": world, "painter": painter}, "roles": shared}
    with pytest.raises(ConfigError, match=r"roles\.editor: backend 'painter' applies its one"):
        parse_config({**data, "roles": {**shared, "generator": {"backend": "painter",
                                                               "adapter": "draw@1"}}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"x\.toml: roles\.editor: backend 'painter' applies"):
        with_role_adapters(parse_config(data), {"generator": "draw@1"}, "x.toml")
    both = with_role_adapters(parse_config(data), {"generator": "d@1", "editor": "d@1"})
    assert both.role("editor").adapter == "d@1"  # type: ignore[union-attr]
    # vLLM-Omni takes a LoRA per request: the roles are independent there.
    per_request = {**painter, "traced": False}
    alone = with_role_adapters(
        parse_config({**data, "backends": {"world": world, "painter": per_request}}),
        {"generator": "draw@1"},
    )
    assert alone.role("editor").adapter is None  # type: ignore[union-attr]


# --- the loop ------------------------------------------------------------------------------------


def _loop_config(tmp: Path, sd3: Path) -> Path:
    path = tmp / "flow.toml"
    path.write_text(
        '[backends.world]\nkind = "shapeworld"\n\n'
        f'[backends.sd3]\nkind = "inprocess-image"\nmodel = "{sd3}"\ntraced = true\nsteps = 2\n'
        'size = "32x32"\ndevice = "cpu"\ntorch_threads = 1\n\n'
        f'[roles]\n{WORLD_ROLES}generator = "sd3"\neditor = "world"\n'
    )
    return path


def _args(
    config: Path, sd3: Path, db: Path, out: Path, iterations: int, policy: str = "draw"
) -> Any:
    from atelier.cli.app import build_parser
    from atelier.cli.train import _reward_weights

    command = ["train", "--config", str(config), "--policy", policy, "--model", str(sd3)]
    command += ["--db", str(db), "--out", str(out), "--iterations", str(iterations), "-G", "3"]
    args = build_parser().parse_args([*command, "--max-rounds", "1", "--seed", "0", *FLOW])
    args.reward_weights = _reward_weights(args.reward_weights)
    return args


def _run_loop(
    store: TrajectoryStore, args: Any, iterations: int, resume: bool = False, mode: str = "direct"
) -> Any:
    from atelier.cli.train_loop_image import build_flow_loop_policy, check_flow_config
    from nodes.state import Budget
    from training.online import LoopSpec, online_iterations

    policy = build_flow_loop_policy(args)
    check_flow_config(args, load_config(args.config), policy)
    spec = LoopSpec(
        name="flow",
        backends_config=args.config,
        prompts=PROMPTS,
        iterations=iterations,
        group_size=3,
        seed=0,
        budget=Budget(max_rounds=1),
        concurrency=8,
        mode=mode,
        save_dir=args.out,
        signature={"policy": args.policy, "flow": list(FLOW)},
    )
    initial = policy.initial(store, spec.name)
    return asyncio.run(
        online_iterations(
            store,
            spec,
            policy,
            initial,
            resume=resume,
            extra_loop={"start_version": policy.start_version},
        )
    )


def _weights(path: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def straight(tiny_sd3: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Two iterations of the draw loop in one go: (store, log)."""
    tmp = tmp_path_factory.mktemp("flow-loop")
    db = tmp / "loop.db"
    args = _args(_loop_config(tmp, tiny_sd3), tiny_sd3, db, tmp / "policies", 2)
    store = TrajectoryStore(f"sqlite:///{db}")
    return store, _run_loop(store, args, 2)


def test_two_iterations_sample_from_the_version_the_first_trained(straight: Any) -> None:
    store, log = straight
    assert [(e.behaviour, e.trained) for e in log] == [("base", "draw@1"), ("draw@1", "draw@2")]
    first, second = store.policy_versions(name="draw")
    assert (first.version, second.version) == ("1", "2")
    assert first.metadata["loop_kind"] == second.metadata["loop_kind"] == "diffusion-lora"
    assert (first.metadata["sampled_by"], second.metadata["sampled_by"]) == (["base"], ["draw@1"])
    # Iteration 0 drew with the base model; iteration 1 only with draw@1, loaded into the
    # in-process flow model, and its draws and transitions name it.
    assert _transition_loras(store, log[0].run_id) == Counter({None: 6})
    assert _transition_loras(store, log[1].run_id) == Counter({"draw@1": 6})
    assert all(step.models == ["draw@1"] for step in _draws(store, log[1].run_id))
    assert store.run(log[1].run_id).config["adapters"] == {"generator": "draw@1"}
    # The sampler's log-probs recompute under the trainer's weights (ratio 1 before each
    # iteration's first update): the version served is the version trained.
    for version in (first, second):
        assert version.metadata["first_max_abs_log_ratio"] < 1e-4
        assert version.metadata["steps"] >= 1
    trained = Counter(r.details["trained"] for r in store.rewards(name="flow_advantage"))
    assert set(trained) == {"draw@1", "draw@2"}


def test_a_resumed_loop_makes_each_version_once_and_stores_no_reward_twice(
    straight: Any, tiny_sd3: Path, tmp_path: Path
) -> None:
    db = tmp_path / "loop.db"
    config = _loop_config(tmp_path, tiny_sd3)
    store = TrajectoryStore(f"sqlite:///{db}")
    first = _run_loop(store, _args(config, tiny_sd3, db, tmp_path / "policies", 1), 1)
    assert [e.trained for e in first] == ["draw@1"]
    checkpoint = tmp_path / "policies" / ".loop-flow" / "draw-1"
    assert json.loads((checkpoint / "config.json").read_text())["version"] == "1"

    args = _args(config, tiny_sd3, db, tmp_path / "policies", 2)  # a fresh process, as it were
    log = _run_loop(store, args, 2, resume=True)
    assert [(e.trained, e.resumed) for e in log] == [("draw@1", True), ("draw@2", False)]
    assert [v.version for v in store.policy_versions(name="draw")] == ["1", "2"]
    runs = [r for r in store.runs() if (r.config.get("loop") or {}).get("name") == "flow"]
    assert len(runs) == 2
    ids = [t.id for r in runs for t in store.trajectories(run=r.id, limit=None)]
    keys = Counter((r.trajectory_id, r.step_seq, r.name) for r in store.rewards(trajectory_ids=ids))
    assert keys and max(keys.values()) == 1
    # The trainer continued from its checkpoint (AdamW moments, step count, minibatch order):
    # the same versions as the loop never stopped.
    straight_store, _ = straight
    for done, resumed in zip(
        straight_store.policy_versions(name="draw"), store.policy_versions(name="draw"), strict=True
    ):
        a, b = _weights(done.path), _weights(resumed.path)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5)
    assert (
        store.policy_versions(name="draw")[1].metadata["optimizer_steps"]
        == (straight_store.policy_versions(name="draw")[1].metadata["optimizer_steps"])
    )


def test_a_refine_loop_samples_its_edits_from_the_version_it_trained(
    tiny_sd3: Path, tmp_path: Path
) -> None:
    """The editor's LoRA, on its own traced model (one loaded adapter each: the generator's
    model stays the base one): iteration 1's refine steps are sampled by refine@1."""
    config = tmp_path / "refine.toml"
    painter = f'kind = "inprocess-image"\nmodel = "{tiny_sd3}"\ntraced = true\nsteps = 2\n'
    config.write_text(
        f'[backends.world]\nkind = "shapeworld"\n\n[backends.painter]\n{painter}size = "32x32"\n'
        f'\n[backends.editor]\n{painter}\n[roles]\n{WORLD_ROLES}generator = "painter"\n'
        'editor = "editor"\n'
    )
    db = tmp_path / "loop.db"
    store = TrajectoryStore(f"sqlite:///{db}")
    args = _args(config, tiny_sd3, db, tmp_path / "policies", 2, policy="refine")
    log = _run_loop(store, args, 2, mode="reflect")
    assert [e.trained for e in log] == ["refine@1", "refine@2"] and log[1].behaviour == "refine@1"
    ids = [t.id for t in store.trajectories(run=log[1].run_id, limit=None)]
    refines = [s for steps in store.steps_many(ids).values() for s in steps if s.node == "refine"]
    assert refines and all(step.models == ["refine@1"] for step in refines)
    assert _transition_loras(store, log[1].run_id)["refine@1"] == len(refines)
    for version in store.policy_versions(name="refine"):
        assert version.metadata["reward"] == "refinement"
        assert version.metadata["first_max_abs_log_ratio"] < 1e-4


@pytest.mark.parametrize(
    ("policy", "painter", "message"),
    [
        (
            "draw",
            'kind = "omni"\nurls = ["http://127.0.0.1:9"]',
            r"serves it with omni \(untraced\)",
        ),
        (
            "refine",
            'kind = "omni"\nurls = ["http://127.0.0.1:9"]\ntraced = true',
            "traces generations only",
        ),
        (
            "draw",
            'kind = "omni"\nurls = ["http://127.0.0.1:9"]\ntraced = true\nadapter_mode = "request"',
            "adapter_mode = 'request'",
        ),
        (
            "draw",
            'kind = "inprocess-image"\nmodel = "{sd3}"\ntraced = true\nlora = "{lora}"',
            "backends.painter.lora is",
        ),
    ],
)
def test_the_loop_refuses_a_file_it_cannot_deploy_its_versions_through(
    tiny_sd3: Path, tmp_path: Path, policy: str, painter: str, message: str
) -> None:
    from atelier.cli.errors import CliError
    from atelier.cli.train_loop_image import FlowLoopPolicy, check_flow_config

    lora = _draw_lora(tiny_sd3, tmp_path / "draw-1") if "{lora}" in painter else None
    config = tmp_path / "loop.toml"
    config.write_text(
        f'[backends.world]\nkind = "shapeworld"\n\n[backends.painter]\n'
        f"{painter.format(sd3=tiny_sd3, lora=lora)}\n\n"
        f'[roles]\n{WORLD_ROLES}generator = "painter"\neditor = "world"\n'
    )
    if policy == "refine":
        config.write_text(config.read_text().replace('editor = "world"', 'editor = "painter"'))
    args = _args(config, tiny_sd3, tmp_path / "a.db", tmp_path / "out", 1)
    args.policy = policy
    with pytest.raises(CliError, match=message) as error:
        check_flow_config(args, load_config(config), FlowLoopPolicy(args))
    assert "\n" not in str(error.value)


def test_the_loop_refuses_an_editor_left_unnamed_on_the_drawing_model(
    tiny_sd3: Path, tmp_path: Path
) -> None:
    from atelier.cli.errors import CliError
    from atelier.cli.train_loop_image import FlowLoopPolicy, check_flow_config

    config = _loop_config(tmp_path, tiny_sd3)
    config.write_text(config.read_text().replace('editor = "world"', 'editor = "sd3"'))
    args = _args(config, tiny_sd3, tmp_path / "a.db", tmp_path / "out", 1)
    with pytest.raises(CliError, match=r"roles\.editor: backend 'sd3' applies its one loaded"):
        check_flow_config(args, load_config(config), FlowLoopPolicy(args))
