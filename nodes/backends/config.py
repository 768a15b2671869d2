"""Backends per role from a config file (TOML or JSON): which model serves each graph role.

    [backends.vlm]                      # a named backend; several roles may share it
    kind = "openai"                     # or shapeworld, omni, inprocess-lm, inprocess-image
    urls = ["http://10.0.0.5:8000", "http://10.0.0.6:8000"]
    model = "Qwen/Qwen2.5-VL-7B-Instruct"
    token_env = "ATELIER_SERVER_TOKEN"  # or token = "..." (avoid secrets in files)
    max_in_flight = 16                  # per server; more requests wait for a slot

    [backends.vlm.sampling]             # optional: every chat request to this backend
    max_tokens = 512                    # (fields left out keep what the graph asks for)
    temperature = 1.0

    [backends.painter]
    kind = "omni"
    urls = ["http://10.0.0.7:8001"]
    size = "512x512"                    # optional: draw at this size, whatever the graph asks
    steps = 4                           # optional: when the graph sets no step count
    adapter_mode = "request"            # optional: how a role's diffusion LoRA reaches it

    [roles]
    planner = { backend = "vlm", sampling = { max_tokens = 256 } }   # per role, over the above
    reflector = { backend = "vlm", adapter = "reflect@2" }   # a trained LoRA adapter version
    decomposer = "vlm"
    generator = { backend = "painter", adapter = "draw@1" }   # a trained diffusion LoRA
    editor = "painter"
    judge = "vlm"                       # optional; a chat backend judges by P(yes)

    [policies]                          # optional: trained decision-policy versions
    router = "router@3"                 # the mode policy (instead of the built-in --mode)
    stop = "policies/stop-2"            # the stop policy (instead of following the reflection)

    [rewards]                           # optional: what `atelier train --run` rewards with
    source = "gvu"                      # checker (default), judge or gvu
    backend = "vlm"                     # the scoring VLM (default: the judge role's backend)
    instruction = "Describe this image."   # gvu: the user turn the prompt is scored against
    top_logprobs = 20                   # judge: top-k log-probs of the one-token answer

A role's ``adapter`` (chat roles and the judge, on ``openai`` / ``inprocess-lm`` backends) is
one of three things:

- ``name@version`` (``reflect@2``): a LoRA adapter version ``atelier train`` saved and
  registered in the store; its directory is the one the store's registry names;
- a directory (a value with a ``/``, or starting with ``.`` or ``~``; relative to this file's
  folder): a saved adapter, named by the store's registry when it registers that directory
  (else by the directory's name);
- a plain name (``reflector-v3``): an adapter the servers already serve under that name
  (``atelier serve lm --lora NAME=DIR``, vLLM's ``--lora-modules``); nothing is loaded.

A version or directory is loaded on every server of the role's backend before anything runs
(``POST /v1/load_lora_adapter`` with ``load_inplace``, so a server already serving it is left
with the same weights; in-process backends load it into their model), under the name
``name@version``, which the role's requests then ask for: each recorded generation's model
names the version. The servers read the directory at the path given (the same machine, or a
shared filesystem).

An image role's ``adapter`` (generator, editor) is a diffusion LoRA (``policies.diffusion_lora``,
what ``atelier train --policy draw|refine`` saves), written the same three ways, on

- an ``omni`` backend. How it reaches the servers is the backend's ``adapter_mode``: ``load``
  (Atelier's ``atelier serve image``: ``POST /v1/load_lora_adapter`` on every replica before
  anything runs, and every request of the role names it in vLLM-Omni's ``lora`` field, which
  that server checks against what it loaded: a replica restarted without it answers 400, never
  an image of another policy) or ``request`` (vLLM-Omni, which has no load endpoint: only the
  per-request ``lora`` field, ``{name, local_path, scale}``, which it loads on demand). Unset,
  it is ``load`` on a ``traced`` backend (only Atelier's server traces) and ``request``
  otherwise. The mode is written, not probed from the load endpoint: a 404 cannot tell
  vLLM-Omni from a proxy, a server started without runtime LoRA loading or a wrong URL, and the
  mode decides which policy each recorded image was sampled by;
- an ``inprocess-image`` backend with ``traced = true`` and no ``lora`` of its own: loaded into
  its flow model (a version or a directory; there is no server to serve a name).

An in-process model and a server that loads its adapter apply their one loaded adapter to every
request, so the image roles on such a backend name the same adapter, or none (a
:class:`ConfigError` otherwise: the other role's images would be sampled by a policy it does not
name). The draw and refine steps record the version's ``name@version`` as their model, and
every denoising transition names it as its ``lora`` (what Flow-GRPO's groups check).

``[policies]`` takes ``router`` and ``stop``, each ``name@version`` or a saved policy directory
(relative to this file's folder); the command line's ``--router``, ``--stop`` (and ``--mode``,
for the router) override them. ``name@version`` needs the store (``--db``):
:func:`configure_backends` resolves every version and says what is wrong with one (not
registered, its directory missing, a router where a stop policy or an adapter belongs, a text
adapter where a diffusion LoRA belongs, a LoRA whose own file names another version).

``[rewards]`` picks the outcome reward R_o that ``atelier train --run`` trains decision
policies on, for runs recorded with this file (``training.rewards.sources``): ``checker``, the
judge score each run stored (the default); ``judge``, the VLM's P(yes) / (P(yes) + P(no)),
stored as ``vlm_yes``; ``gvu``, GvU's intrinsic reward, the geometric mean of the prompt tokens'
probabilities given the image, stored as ``gvu``. ``backend`` names the VLM that scores (an
``openai`` or ``inprocess-lm`` backend; default: the judge role's, with its adapter), which
``judge`` and ``gvu`` need; ``instruction`` applies to ``gvu``, ``top_logprobs`` to ``judge``
(without it, and without ``backend``, ``judge`` rescores with the judge role as configured).
The command line's ``--reward-source``, ``--gvu-instruction`` and ``--judge-top-logprobs``
override the table.

``sampling`` (on ``openai`` / ``inprocess-lm`` backends, and on chat roles) takes
``max_tokens``, ``temperature``, ``top_p``, ``top_k`` and ``repetition_penalty``; a role's
fields win over its backend's, which win over the graph's ``GraphSettings.sampling``. The seed
is never set here: each call's seed derives from the trajectory's.

Strings may use ``${VAR}`` or ``${VAR:-default}``; relative model paths are resolved against the
config file's folder, and local model folders (``inprocess-*`` backends) must exist and hold a
model of the right kind. Unknown keys are errors naming the key (``extra="forbid"``).

``build_backends(load_config(path))`` returns ``{role: backend}`` for planner, reflector,
decomposer, generator, editor and judge (None when absent). Building connects to nothing: HTTP
clients open connections on first use; in-process models load here. It requests adapters by
name and loads none: :func:`configure_backends` resolves the versions a config names against a
store, builds the backends, and its ``load_adapters()`` loads the adapter versions on the servers
(what ``atelier run``/``rollout``/``resume --config`` do).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from policies.deployed import DeployedVersion, VersionError, is_version_name, resolve_version

CHAT_ROLES = ("planner", "reflector", "decomposer")
IMAGE_ROLES = ("generator", "editor")
ROLES = (*CHAT_ROLES, *IMAGE_ROLES, "judge")
REQUIRED_ROLES = (*CHAT_ROLES, *IMAGE_ROLES)
Role = Literal["planner", "reflector", "decomposer", "generator", "editor", "judge"]

CHAT_KINDS = ("shapeworld", "openai", "inprocess-lm")
IMAGE_KINDS = ("shapeworld", "omni", "inprocess-image")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the bad key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingSpec(_Strict):
    """Sampling fields a backend or role fixes; those left out keep what the graph asks."""

    max_tokens: int | None = Field(None, ge=1)
    """New tokens at most (Atelier's engines also clamp it to the model's context)."""
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    """The k most likely tokens only; -1 (or 0): all. Unset, the ``openai`` client still sends
    -1 (and ``repetition_penalty`` 1, ``min_p`` 0): vLLM would otherwise fill them from the
    model's ``generation_config.json``."""
    repetition_penalty: float | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _no_seed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "seed" in data:
            raise ValueError(
                "seed cannot be set here: each call's seed derives from the trajectory's seed, "
                "so runs are reproducible"
            )
        return data

    def overrides(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def _check_size(value: str | None) -> str | None:
    if value is not None:
        from nodes.backends.wire import parse_size

        parse_size(value)  # a ValueError naming the value
    return value


class ShapeWorldBackend(_Strict):
    kind: Literal["shapeworld"]
    options: dict[str, Any] = Field(default_factory=dict)
    """Fields of :class:`~nodes.backends.shapeworld.ShapeWorldConfig` (checked when built)."""


def _check_url(value: str) -> str:
    """A server's base URL: ``http://`` or ``https://`` with a host (anything else would only
    fail at the first request, as a connection error far from the config's key)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        parts = None
    if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        shown = value if parts is None or "@" not in parts.netloc else "(a URL with credentials)"
        raise ValueError(
            f"{shown[:80]!r} is not a server URL (http:// or https://, a host, an optional port)"
        )
    return value


class _Remote(_Strict):
    urls: list[Annotated[str, AfterValidator(_check_url)]] = Field(min_length=1)
    """Base URLs of equivalent servers (load balanced): ``http://`` or ``https://``."""
    model: str | None = None
    """Served model name (None: the first one ``/v1/models`` lists; omni: not sent)."""
    token: str | None = None
    token_env: str | None = None
    """Name of an environment variable holding the bearer token."""
    balance: Literal["least_inflight", "round_robin"] = "least_inflight"
    timeout_s: float = Field(120.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    retries: int = Field(3, ge=0)
    backoff_s: float = Field(0.25, ge=0)
    cooldown_s: float = Field(5.0, ge=0)
    health_interval_s: float | None = Field(None, ge=0)
    """Probe ``/health`` on every server at most this often, before requests (None: never)."""
    max_in_flight: int | None = Field(None, ge=1)
    """Most requests in flight per server; more wait for a free slot (None: no cap)."""
    extra_body: dict[str, Any] = Field(default_factory=dict)
    """More request fields, passed through (e.g. ``guidance_scale``, ``top_k``)."""


class OpenAIBackend(_Remote):
    kind: Literal["openai"]
    legacy_token_ids: bool = False
    sampling: SamplingSpec | None = None
    """Sampling fields for every chat request to this backend (roles may override)."""


class OmniBackend(_Remote):
    kind: Literal["omni"]
    edit_size: Literal["input", "auto"] = "input"
    size: str | None = None
    """Draw every image at this size ("WxH"), whatever size the graph asks for."""
    steps: int | None = Field(None, ge=1)
    """Denoising steps to ask for when the graph sets none (None: the server's default)."""

    @field_validator("size")
    @classmethod
    def _valid_size(cls, value: str | None) -> str | None:
        return _check_size(value)

    traced: bool = False
    """Ask the server for each image's diffusion transitions (``return_transitions``), so the
    draw/refine steps record what Flow-GRPO trains on (``atelier serve image`` answers it)."""
    adapter_mode: Literal["load", "request"] | None = None
    """How a role's diffusion LoRA reaches the servers: ``load`` (``atelier serve image``: loaded
    on every replica, then named per request) or ``request`` (vLLM-Omni: the per-request
    ``lora`` field only). None: ``load`` when ``traced``, else ``request`` (see the module doc)."""

    @property
    def loads_adapters(self) -> bool:
        """Whether a role's adapter is loaded on the servers (one active adapter each)."""
        return self.adapter_mode == "load" or (self.adapter_mode is None and self.traced)


class InProcessLMBackend(_Strict):
    kind: Literal["inprocess-lm"]
    model: str
    """A model directory (``save_pretrained``): a VLM or a causal LM."""
    name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = Field(8, ge=1)
    max_wait_ms: float = Field(5.0, ge=0)
    torch_threads: int | None = Field(None, ge=1)
    adapters: dict[str, str] = Field(default_factory=dict)
    """LoRA adapters loaded at start: name -> directory."""
    sampling: SamplingSpec | None = None
    """Sampling fields for every chat request to this backend (roles may override)."""


class InProcessImageBackend(_Strict):
    kind: Literal["inprocess-image"]
    model: str | None = None
    edit_model: str | None = None
    name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    steps: int | None = Field(None, ge=1)
    max_batch: int = Field(4, ge=1)
    max_wait_ms: float = Field(10.0, ge=0)
    torch_threads: int | None = Field(None, ge=1)
    traced: bool = False
    """Sample with the Flow-GRPO SDE sampler and record each image's transitions (a
    flow-matching ``model``, e.g. SD3; edits are image-to-image on the same model)."""
    lora: str | None = None
    """A diffusion LoRA directory (``policies.diffusion_lora``) to load, with ``traced``."""
    size: str | None = None
    """Draw every image at this size ("WxH"), whatever size the graph asks for."""

    @field_validator("size")
    @classmethod
    def _valid_size(cls, value: str | None) -> str | None:
        return _check_size(value)

    @model_validator(mode="after")
    def _some_model(self) -> InProcessImageBackend:
        if self.model is None and self.edit_model is None:
            raise ValueError("set model and/or edit_model")
        if self.traced and (self.model is None or self.edit_model is not None):
            raise ValueError("traced sampling needs model (and no edit_model: it edits with it)")
        if self.lora is not None and not self.traced:
            raise ValueError("lora is loaded by the traced sampler: set traced = true")
        return self


BackendSpec = Annotated[
    Union[  # noqa: UP007 - a discriminated union reads best spelled out
        ShapeWorldBackend, OpenAIBackend, OmniBackend, InProcessLMBackend, InProcessImageBackend
    ],
    Field(discriminator="kind"),
]


class RoleSpec(_Strict):
    backend: str
    adapter: str | None = Field(None, min_length=1)
    """A LoRA adapter (chat roles on openai / inprocess-lm backends; a diffusion LoRA on image
    roles, on omni or traced inprocess-image backends): ``name@version``, a saved adapter's
    directory, or the name of one the servers already serve (see the module doc)."""
    sampling: SamplingSpec | None = None
    """Sampling fields for this role's requests, over its backend's ``sampling``."""


class PoliciesSpec(_Strict):
    """Trained decision-policy versions: ``name@version`` (registered in the store) or a saved
    policy directory (relative to the config file's folder)."""

    router: str | None = Field(None, min_length=1)
    """The mode policy (replaces the built-in one ``--mode`` picks)."""
    stop: str | None = Field(None, min_length=1)
    """The stop policy (replaces following the reflection's verdict)."""


REWARD_SOURCES = ("checker", "judge", "gvu")
"""What ``[rewards] source`` (and ``atelier train --reward-source``) takes."""


class RewardsSpec(_Strict):
    """The outcome reward decision policies train on (``atelier train --run``)."""

    source: Literal["checker", "judge", "gvu"] = "checker"
    """checker: the stored judge score; judge: a VLM's yes-probability (``vlm_yes``); gvu: GvU's
    intrinsic reward (``gvu``)."""
    backend: str | None = Field(None, min_length=1)
    """The scoring VLM, an openai or inprocess-lm backend (default: the judge role's)."""
    top_logprobs: int | None = Field(None, ge=0)
    """judge: top-k log-probs read from the one-token answer (0: the exact two-request path)."""
    instruction: str | None = Field(None, min_length=1)
    """gvu: the user turn (with the image) the prompt is scored as the answer to."""


class BackendsConfig(_Strict):
    backends: dict[str, BackendSpec] = Field(min_length=1)
    roles: dict[Role, str | RoleSpec]
    policies: PoliciesSpec | None = None
    rewards: RewardsSpec | None = None

    @model_validator(mode="after")
    def _check_roles(self) -> BackendsConfig:
        missing = [r for r in REQUIRED_ROLES if r not in self.roles]
        if missing:
            raise ValueError(f"roles: missing {', '.join(missing)}")
        for role, spec in self.roles.items():
            spec = spec if isinstance(spec, RoleSpec) else RoleSpec(backend=spec)
            backend = self.backends.get(spec.backend)
            if backend is None:
                known = ", ".join(sorted(self.backends))
                raise ValueError(
                    f"roles.{role}: no backend named {spec.backend!r} (known: {known})"
                )
            allowed = IMAGE_KINDS if role in IMAGE_ROLES else CHAT_KINDS
            if backend.kind not in allowed:
                raise ValueError(
                    f"roles.{role}: backend {spec.backend!r} is of kind {backend.kind!r}; "
                    f"this role needs one of {', '.join(allowed)}"
                )
            problem = _adapter_problem(role, spec, backend)
            if problem:
                raise ValueError(f"roles.{role}: {problem}")
            if spec.sampling and (role not in CHAT_ROLES or backend.kind == "shapeworld"):
                raise ValueError(
                    f"roles.{role}: sampling applies to chat roles ({', '.join(CHAT_ROLES)}) "
                    "on an openai or inprocess-lm backend"
                )
        problem = _shared_adapter_problem(self)
        if problem:
            raise ValueError(problem)
        self._check_rewards()
        return self

    def _check_rewards(self) -> None:
        rewards = self.rewards
        if rewards is None:
            return
        if rewards.backend is not None:
            backend = self.backends.get(rewards.backend)
            if backend is None:
                known = ", ".join(sorted(self.backends))
                raise ValueError(
                    f"rewards.backend: no backend named {rewards.backend!r} (known: {known})"
                )
            if backend.kind not in ("openai", "inprocess-lm"):
                raise ValueError(
                    f"rewards.backend: backend {rewards.backend!r} is of kind {backend.kind!r}; "
                    "the scoring VLM needs an openai or inprocess-lm backend"
                )
        elif rewards.source in ("judge", "gvu"):
            judge = self.role("judge")
            kind = self.backends[judge.backend].kind if judge is not None else None
            if kind not in ("openai", "inprocess-lm"):
                raise ValueError(
                    f"rewards.source: {rewards.source!r} needs a VLM: set rewards.backend, or "
                    "put the judge role on an openai or inprocess-lm backend"
                )

    def role(self, role: str) -> RoleSpec | None:
        spec = self.roles.get(role)  # type: ignore[call-overload]
        if spec is None or isinstance(spec, RoleSpec):
            return spec
        return RoleSpec(backend=spec)


def _adapter_problem(role: str, spec: RoleSpec, backend: Any) -> str | None:
    """Why ``role`` cannot request ``spec.adapter`` from ``backend`` (None: it can)."""
    if not spec.adapter:
        return None
    if role not in IMAGE_ROLES:
        if backend.kind in ("openai", "inprocess-lm"):
            return None
        return "adapters need an openai or inprocess-lm backend"
    if isinstance(backend, OmniBackend):
        return None
    if isinstance(backend, InProcessImageBackend) and backend.traced:
        if backend.lora is not None:
            return (
                f"backend {spec.backend!r} loads its own lora ({backend.lora}); name the "
                "diffusion LoRA in one place (the role's adapter, or the backend's lora)"
            )
        if adapter_kind(spec.adapter) == "name":
            return (
                f"adapter {spec.adapter!r}: an in-process model loads a diffusion LoRA "
                "version (name@version) or directory, not a served name"
            )
        return None
    return (
        f"a diffusion LoRA adapter needs an omni backend or an inprocess-image backend with "
        f"traced = true (a flow-matching model), not {spec.backend!r} of kind {backend.kind!r}"
    )


def _shared_adapter_problem(config: BackendsConfig) -> str | None:
    """Image roles on a backend with one active adapter (an in-process flow model, a server
    that loads it) must name the same adapter: it samples every role's images."""
    named: dict[str, tuple[str, str | None]] = {}
    for role in IMAGE_ROLES:
        spec = config.role(role)
        if spec is None:
            continue
        backend = config.backends[spec.backend]
        one_active = isinstance(backend, InProcessImageBackend) or (
            isinstance(backend, OmniBackend) and backend.loads_adapters
        )
        if not one_active:
            continue
        if spec.backend in named and named[spec.backend][1] != spec.adapter:
            other, adapter = named[spec.backend]
            return (
                f"roles.{role}: backend {spec.backend!r} applies its one loaded diffusion LoRA "
                f"to every request, and roles.{other} names {adapter or 'none'} there, "
                f"roles.{role} {spec.adapter or 'none'}: give both the same adapter, or one of "
                "them its own backend"
            )
        named[spec.backend] = (role, spec.adapter)
    return None


# --- loading -------------------------------------------------------------------------------------

_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def _expand(value: Any, where: str) -> Any:
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            name, default = match["name"], match["default"]
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"{where}: environment variable {name} is not set")

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    for spec in (data.get("backends") or {}).values():
        if not isinstance(spec, dict) or spec.get("kind") not in (
            "inprocess-lm",
            "inprocess-image",
        ):
            continue
        for key in ("model", "edit_model", "lora"):
            value = spec.get(key)
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                spec[key] = str((base / value).resolve())
            elif isinstance(value, str):
                spec[key] = str(Path(value).expanduser())
        adapters = spec.get("adapters")
        if isinstance(adapters, dict):
            for name, path in adapters.items():
                if isinstance(path, str) and not Path(path).expanduser().is_absolute():
                    adapters[name] = str((base / path).resolve())
    for spec in (data.get("roles") or {}).values():
        adapter = spec.get("adapter") if isinstance(spec, dict) else None
        if isinstance(adapter, str) and adapter_kind(adapter) == "directory":
            spec["adapter"] = _absolute(adapter, base)
    policies = data.get("policies")
    if isinstance(policies, dict):
        for kind, ref in policies.items():
            if isinstance(ref, str) and ref.strip() and not is_version_name(ref):
                policies[kind] = _absolute(ref, base)


def _absolute(path: str, base: Path) -> str:
    expanded = Path(path).expanduser()
    return str(expanded if expanded.is_absolute() else (base / expanded).resolve())


def adapter_kind(adapter: str) -> Literal["version", "directory", "name"]:
    """How a role's ``adapter`` reads: ``name@version``, a directory (a ``/``, or a leading
    ``.`` or ``~``), or the plain name of an adapter the servers already serve."""
    if is_version_name(adapter):
        return "version"
    if "/" in adapter or "\\" in adapter or adapter.startswith((".", "~")):
        return "directory"
    return "name"


def _role_errors(errors: list[Any]) -> list[Any]:
    """A role is a backend name or a table (a union): report one line per problem, without
    the union's branch names, and no "not a string" when the table itself has errors."""
    tables = {e["loc"][1] for e in errors if e["loc"][:1] == ("roles",) and len(e["loc"]) > 3}
    kept = []
    for e in errors:
        loc = tuple(e["loc"])
        if loc[:1] == ("roles",) and len(loc) >= 3 and loc[2] in ("str", "RoleSpec"):
            if len(loc) == 3 and (loc[1] in tables or loc[2] == "RoleSpec"):
                continue  # noise beside the table's own errors, or a duplicate type error
            if len(loc) == 3:
                e = {**e, "msg": "should be a backend name or a table (backend = ..., ...)"}
            e = {**e, "loc": (*loc[:2], *loc[3:])}
        kept.append(e)
    return kept


def _error_lines(error: ValidationError) -> list[str]:
    lines = []
    for e in _role_errors(error.errors()):
        loc = list(e["loc"])
        if (
            len(loc) >= 3
            and loc[0] == "backends"
            and loc[2] in ("shapeworld", "openai", "omni", "inprocess-lm", "inprocess-image")
        ):
            del loc[2]  # the union's tag adds nothing a reader needs
        key = ".".join(
            str(part) for part in loc if part != "[key]" and not str(part).startswith("function-")
        )
        message = e["msg"].removeprefix("Value error, ")
        lines.append(f"{key}: {message}" if key else message)
    return lines


def _format_errors(error: ValidationError, source: str) -> str:
    """One line (the CLI's error contract): every problem, each naming its key."""
    return f"{source}: invalid config: " + "; ".join(_error_lines(error))


def _path_problems(name: str, spec: Any) -> list[str]:
    """What is wrong with the local model folders an in-process backend names."""
    from nodes.backends.model_dirs import (
        adapter_dir_problem,
        image_dir_problem,
        lm_dir_problem,
    )

    checks: list[tuple[str, str | None, Any]] = []
    if isinstance(spec, InProcessLMBackend):
        checks.append(("model", spec.model, lm_dir_problem))
        for adapter, path in spec.adapters.items():
            checks.append((f"adapters.{adapter}", path, adapter_dir_problem))
    elif isinstance(spec, InProcessImageBackend):
        checks.append(("model", spec.model, image_dir_problem))
        checks.append(("edit_model", spec.edit_model, image_dir_problem))
        checks.append(("lora", spec.lora, adapter_dir_problem))
    problems = []
    for field, path, check in checks:
        problem = check(path) if path is not None else None
        if problem:
            problems.append(f"backends.{name}.{field}: {problem}")
    return problems


def check_model_paths(config: BackendsConfig, source: str = "<config>") -> None:
    """A :class:`ConfigError` naming each in-process backend field whose model folder is
    missing or of the wrong kind (found here in one line, not as a loader's traceback later)."""
    problems = [line for n, spec in config.backends.items() for line in _path_problems(n, spec)]
    if not problems:
        return
    message = f"{source}: {problems[0]}"
    if len(problems) > 1:  # one line: the first in full, the others by name
        others = ", ".join(line.split(": ", 1)[0] for line in problems[1:])
        message += f" (also wrong: {others})"
    raise ConfigError(message)


def parse_config(
    data: dict[str, Any],
    *,
    base: Path | None = None,
    source: str = "<config>",
    check_paths: bool = True,
) -> BackendsConfig:
    """Validate a config already read into a dict (``base``: where relative paths start;
    ``check_paths``: also check that in-process backends' model folders exist)."""
    try:
        data = _expand(data, "")
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    _resolve_paths(data, base or Path.cwd())
    try:
        config = BackendsConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None
    if check_paths:
        check_model_paths(config, source)
    return config


def _toml() -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError("TOML configs need Python 3.11+ or tomli; or use JSON") from None
    return tomllib


def load_config(path: str | Path, *, check_paths: bool = True) -> BackendsConfig:
    """Read and validate a TOML or JSON config (see :func:`parse_config`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror or error}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else _toml().loads(text)
    except ValueError as error:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError(
            f"{path}: not valid {path.suffix.lstrip('.').upper() or 'TOML'}: {error}"
        ) from None
    return parse_config(data, base=path.parent, source=str(path), check_paths=check_paths)


# --- building ------------------------------------------------------------------------------------


def _token(spec: _Remote) -> str | None:
    if spec.token:
        return spec.token
    if spec.token_env:
        return os.environ.get(spec.token_env) or None
    return None


def _pool(spec: _Remote) -> Any:
    from nodes.backends.clients.pool import RetryPolicy, ServerPool, Timeouts

    return ServerPool(
        spec.urls,
        token=_token(spec),
        strategy=spec.balance,
        retry=RetryPolicy(
            retries=spec.retries, backoff_s=spec.backoff_s, cooldown_s=spec.cooldown_s
        ),
        timeouts=Timeouts(request_s=spec.timeout_s, connect_s=spec.connect_timeout_s),
        health_interval_s=spec.health_interval_s,
        max_in_flight=spec.max_in_flight,
    )


def build_backend(name: str, spec: Any) -> Any:
    """One backend object from its spec (ShapeWorld: the whole world; roles pick a part)."""
    if isinstance(spec, ShapeWorldBackend):
        from nodes.backends.shapeworld import ShapeWorldConfig, make_shapeworld

        try:
            world_config = ShapeWorldConfig(**spec.options)
        except ValidationError as error:
            raise ConfigError(
                "; ".join(f"backends.{name}.options.{line}" for line in _error_lines(error))
            ) from None
        return make_shapeworld(world_config)
    if isinstance(spec, OpenAIBackend):
        from nodes.backends.clients.openai_client import OpenAIChatClient

        return OpenAIChatClient(
            model=spec.model,
            extra_body=spec.extra_body,
            legacy_token_ids=spec.legacy_token_ids,
            pool=_pool(spec),
        )
    if isinstance(spec, OmniBackend):
        from nodes.backends.clients.omni_client import OmniImageClient, TracedOmniImageClient

        client = TracedOmniImageClient if spec.traced else OmniImageClient
        return client(
            model=spec.model,
            extra_body=spec.extra_body,
            edit_size=spec.edit_size,
            pool=_pool(spec),
        )
    if isinstance(spec, InProcessLMBackend):
        from nodes.backends.engines.lm_inprocess import InProcessChatModel, LMService

        service = LMService.from_pretrained(
            spec.model,
            name=spec.name,
            device=spec.device,
            dtype=spec.dtype,
            max_batch=spec.max_batch,
            max_wait_ms=spec.max_wait_ms,
            torch_threads=spec.torch_threads,
        )
        for adapter, path in spec.adapters.items():
            try:
                service.engine.load_adapter(adapter, path)
            except ValueError as error:
                service.close()
                raise ConfigError(f"backends.{name}.adapters.{adapter}: {error}") from None
        return InProcessChatModel(service)
    if isinstance(spec, InProcessImageBackend) and spec.traced:
        from nodes.backends.engines.flow_image import FlowImageModel

        return FlowImageModel.from_pretrained(
            spec.model,
            name=spec.name,
            device=spec.device,
            dtype=spec.dtype,
            lora_dir=spec.lora,
            max_batch=spec.max_batch,
            max_wait_ms=spec.max_wait_ms,
            torch_threads=spec.torch_threads,
            **({"default_steps": spec.steps} if spec.steps else {}),
        )
    if isinstance(spec, InProcessImageBackend):
        from nodes.backends.engines.image_inprocess import InProcessImageModel

        return InProcessImageModel.from_pretrained(
            spec.model,
            edit_model_dir=spec.edit_model,
            name=spec.name,
            device=spec.device,
            dtype=spec.dtype,
            default_steps=spec.steps,
            max_batch=spec.max_batch,
            max_wait_ms=spec.max_wait_ms,
            torch_threads=spec.torch_threads,
        )
    raise ConfigError(f"backends.{name}: unknown kind")  # pragma: no cover - validated


def _sampling(spec: Any, role_spec: RoleSpec) -> dict[str, Any]:
    """The role's sampling fields over its backend's (empty: the graph's, untouched)."""
    overrides: dict[str, Any] = {}
    for layer in (getattr(spec, "sampling", None), role_spec.sampling):
        if layer is not None:
            overrides.update(layer.overrides())
    return overrides


def _image_settings(spec: Any) -> dict[str, Any]:
    from nodes.backends.wire import parse_size

    settings: dict[str, Any] = {}
    if getattr(spec, "size", None):
        settings["size"] = parse_size(spec.size)
    if isinstance(spec, OmniBackend) and spec.steps is not None:
        settings["steps"] = spec.steps  # in-process backends take steps at load time
    return settings


def _for_role(
    role: str,
    built: Any,
    spec: Any,
    role_spec: RoleSpec,
    shared: dict[Any, Any],
    adapter: str | None,
    adapter_path: str | None = None,
) -> Any:
    """The object serving ``role`` (requesting ``adapter``: its served name; an omni backend
    also sends ``adapter_path``, the version's directory, in each request's ``lora``);
    ``shared`` keeps one wrapper per distinct setting, so roles configured alike share one
    object as they share the backend."""
    from nodes.backends.overrides import SampledChatModel, sized_image_model

    if isinstance(spec, ShapeWorldBackend):
        return getattr(built, role)
    if adapter and isinstance(spec, OmniBackend):
        built = built.with_adapter(adapter, adapter_path)
    elif adapter:
        built = built.with_adapter(adapter)
    if role == "judge":
        from nodes.backends.vlm_judge import VLMJudge

        return VLMJudge(built)
    if role in CHAT_ROLES and (sampling := _sampling(spec, role_spec)):
        key = (role_spec.backend, adapter, tuple(sorted(sampling.items())))
        return shared.setdefault(key, SampledChatModel(built, sampling))
    if role in IMAGE_ROLES and (settings := _image_settings(spec)):
        key = (role_spec.backend, "image", adapter)
        return shared.setdefault(key, sized_image_model(built, **settings))
    return built


def served_adapter(
    role: str, role_spec: RoleSpec, versions: ConfigVersions | None = None
) -> str | None:
    """The adapter name a role's requests ask for: its resolved version's ``name@version``, else
    the name as written (a directory not resolved: its name)."""
    adapter = role_spec.adapter
    if versions is not None and role in versions.adapters:
        return versions.adapters[role].label
    if adapter and adapter_kind(adapter) == "directory":
        return Path(adapter).name
    return adapter


def _build(
    config: BackendsConfig, versions: ConfigVersions | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    used = {spec.backend for spec in map(config.role, ROLES) if spec is not None}
    built = {name: build_backend(name, config.backends[name]) for name in sorted(used)}
    result: dict[str, Any] = {}
    shared: dict[Any, Any] = {}
    for role in ROLES:
        role_spec = config.role(role)
        if role_spec is None:
            result[role] = None
            continue
        spec = config.backends[role_spec.backend]
        adapter = served_adapter(role, role_spec, versions)
        version = versions.adapters.get(role) if versions is not None else None
        result[role] = _for_role(
            role,
            built[role_spec.backend],
            spec,
            role_spec,
            shared,
            adapter,
            version.path if version is not None else None,
        )
    return result, built


def build_backends(
    config: BackendsConfig, versions: ConfigVersions | None = None
) -> dict[str, Any]:
    """``{role: backend}`` for every role (``judge`` is None when the config names none).

    Backends used by several roles are built once and shared (one connection pool, one model
    in memory). The dict's keys match :class:`nodes.context.Backends`' fields. Roles request
    their adapters by name (``versions``: as :func:`resolve_versions` named them); nothing is
    loaded here (see :func:`configure_backends`).
    """
    return _build(config, versions)[0]


def build_reward_backends(config: BackendsConfig) -> tuple[Any, Any]:
    """(the judge role, the VLM ``[rewards] backend`` names), built as :func:`build_backends`
    builds them (either None when not configured); a backend both use is built once, and no
    other role's backend is built. Nothing connects here."""
    rewards = config.rewards or RewardsSpec()
    judge_spec = config.role("judge")
    names = {spec.backend for spec in (judge_spec,) if spec is not None}
    names |= {rewards.backend} if rewards.backend is not None else set()
    built = {name: build_backend(name, config.backends[name]) for name in sorted(names)}
    judge = None
    if judge_spec is not None:
        spec = config.backends[judge_spec.backend]
        adapter = served_adapter("judge", judge_spec)
        judge = _for_role("judge", built[judge_spec.backend], spec, judge_spec, {}, adapter)
    return judge, built.get(rewards.backend) if rewards.backend is not None else None


def load_backends(path: str | Path, *, store: Any = None) -> dict[str, Any]:
    """``build_backends`` of the config at ``path`` (adapter versions resolved against
    ``store`` when given, else requested by the name written; none is loaded)."""
    config = load_config(path)
    versions = resolve_versions(config, store, str(path)) if store is not None else None
    return build_backends(config, versions)


# --- trained versions ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConfigVersions:
    """The trained versions a config names, resolved: ``[policies]`` and the roles' adapters."""

    router: DeployedVersion | None = None
    stop: DeployedVersion | None = None
    adapters: dict[str, DeployedVersion] = dataclasses.field(default_factory=dict)
    """role -> the adapter version it requests (roles naming a plain served name are absent)."""


def resolve_versions(
    config: BackendsConfig, store: Any = None, source: str = "<config>"
) -> ConfigVersions:
    """Every version the config names, checked (``name@version`` looked up in ``store``): a
    :class:`ConfigError` naming the file, the key and what is wrong."""
    from nodes.backends.model_dirs import adapter_dir_problem

    try:
        policies = config.policies or PoliciesSpec()
        router = _policy_version(policies.router, "router", store, source)
        stop = _policy_version(policies.stop, "stop", store, source)
        adapters = {}
        for role in ROLES:
            role_spec = config.role(role)
            if role_spec is None or not role_spec.adapter:
                continue
            if adapter_kind(role_spec.adapter) == "name":
                continue  # served already under that name: nothing to load or resolve
            where = f"{source}: roles.{role}.adapter"
            kind = "diffusion-lora" if role in IMAGE_ROLES else "adapter"
            version = resolve_version(role_spec.adapter, kind, store, what=where)
            problem = adapter_dir_problem(version.path)
            if problem:
                raise ConfigError(f"{where} {role_spec.adapter}: {problem}")
            adapters[role] = version
    except VersionError as error:
        raise ConfigError(str(error)) from None
    return ConfigVersions(router, stop, adapters)


def _policy_version(ref: str | None, kind: str, store: Any, source: str) -> DeployedVersion | None:
    if ref is None:
        return None
    # A value that is not name@version was made absolute when loaded: a path, not a name.
    value: str | Path = ref if is_version_name(ref) else Path(ref)
    return resolve_version(value, kind, store, what=f"{source}: policies.{kind}")


def with_role_adapters(
    config: BackendsConfig, adapters: dict[str, str], source: str = "<config>"
) -> BackendsConfig:
    """``config`` with these roles requesting these adapters (``{role: name@version or an
    absolute directory}``) instead of what the file names: a training loop deploying the
    version it just trained. A role whose backend takes no adapter of its kind (a chat role: an
    openai or inprocess-lm backend; an image role: omni, or traced inprocess-image), or image
    roles left naming different adapters on a backend with one active adapter, is a
    :class:`ConfigError`."""
    roles = dict(config.roles)
    for role, adapter in adapters.items():
        spec = config.role(role)
        if spec is None:
            raise ConfigError(f"{source}: roles.{role} is not set, so no adapter can serve it")
        backend = config.backends[spec.backend]
        updated = spec.model_copy(update={"adapter": adapter})
        problem = _adapter_problem(role, updated, backend)
        if problem:
            raise ConfigError(
                f"{source}: roles.{role} is served by backend {spec.backend!r} of kind "
                f"{backend.kind!r}, which cannot take the trained adapter: {problem}"
            )
        roles[role] = updated  # type: ignore[index]
    changed = config.model_copy(update={"roles": roles})
    problem = _shared_adapter_problem(changed)  # model_copy runs no validator
    if problem:
        raise ConfigError(f"{source}: {problem}")
    return changed


@dataclasses.dataclass
class ConfiguredBackends:
    """A config's backends, built, with the versions it names resolved
    (:func:`configure_backends`); ``await load_adapters()`` before the first request."""

    config: BackendsConfig
    roles: dict[str, Any]
    """``{role: backend}``, as :func:`build_backends` returns it."""
    versions: ConfigVersions
    built: dict[str, Any]
    """backend name -> the built backend (what the adapters are loaded into)."""
    source: str = "<config>"

    def adapter_loads(self) -> list[tuple[str, str, DeployedVersion]]:
        """(first role, backend name, version) for each distinct adapter to load."""
        loads: dict[tuple[str, str, str], tuple[str, str, DeployedVersion]] = {}
        for role, version in self.versions.adapters.items():
            backend = self.config.role(role).backend  # type: ignore[union-attr]
            loads.setdefault((backend, version.label, version.path), (role, backend, version))
        return list(loads.values())

    async def aclose(self) -> None:
        """Release what building the backends opened: HTTP connection pools, in-process models
        (their weights and batching threads). A run that built them closes them when it ends
        (a training loop builds one set per iteration); nothing may use them after."""
        for backend in self.built.values():
            closer = getattr(backend, "aclose", None)
            if closer is not None:
                await closer()
                continue
            close = getattr(backend, "close", None) or getattr(
                getattr(backend, "service", None), "close", None
            )
            if close is not None:
                close()

    async def load_adapters(self) -> None:
        """Load every adapter version on every server (replica) of its backend, under its
        ``name@version`` (an omni backend in ``request`` mode loads nothing: each request names
        the version's directory); a failure is a :class:`ConfigError` naming the role and the
        reason."""
        for role, backend, version in self.adapter_loads():
            spec = self.config.backends[backend]
            if isinstance(spec, OmniBackend) and not spec.loads_adapters:
                continue
            target = self.built[backend]
            try:
                await target.load_adapter(version.label, version.path, inplace=True)
            except Exception as error:  # HTTP errors, a bad adapter, a server that is down
                reason = " ".join(str(error).split()) or type(error).__name__
                raise ConfigError(
                    f"{self.source}: roles.{role}.adapter: loading {version.label} "
                    f"({version.path}) on backend {backend!r} failed: {reason[:300]}"
                ) from None


def configure_backends(
    path: str | Path | BackendsConfig, store: Any = None, *, source: str | None = None
) -> ConfiguredBackends:
    """Load the config (a file, or one already parsed), resolve the versions it names against
    ``store`` (checked before any model loads), and build its backends."""
    if isinstance(path, BackendsConfig):
        config, source = path, source or "<config>"
    else:
        config, source = load_config(path), source or str(path)
    versions = resolve_versions(config, store, source)
    roles, built = _build(config, versions)
    return ConfiguredBackends(config, roles, versions, built, source)
