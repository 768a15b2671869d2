"""Backends per role from a config file (TOML or JSON): which model serves each graph role.

    [backends.vlm]                      # a named backend; several roles may share it
    kind = "openai"                     # or shapeworld, omni, inprocess-lm, inprocess-image
    urls = ["http://10.0.0.5:8000", "http://10.0.0.6:8000"]
    model = "Qwen/Qwen2.5-VL-7B-Instruct"
    token_env = "ATELIER_SERVER_TOKEN"  # or token = "..." (avoid secrets in files)
    max_in_flight = 16                  # per server; more requests wait for a slot

    [backends.painter]
    kind = "omni"
    urls = ["http://10.0.0.7:8001"]

    [roles]
    planner = "vlm"
    reflector = { backend = "vlm", adapter = "reflector-v3" }   # a LoRA adapter by name
    decomposer = "vlm"
    generator = "painter"
    editor = "painter"
    judge = "vlm"                       # optional; a chat backend judges by P(yes)

Strings may use ``${VAR}`` or ``${VAR:-default}``; relative model paths are resolved against the
config file's folder. Unknown keys are errors naming the key (``extra="forbid"``).

``build_backends(load_config(path))`` returns ``{role: backend}`` for planner, reflector,
decomposer, generator, editor and judge (None when absent). Building connects to nothing: HTTP
clients open connections on first use; in-process models load here.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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


class ShapeWorldBackend(_Strict):
    kind: Literal["shapeworld"]
    options: dict[str, Any] = Field(default_factory=dict)
    """Fields of :class:`~nodes.backends.shapeworld.ShapeWorldConfig` (checked when built)."""


class _Remote(_Strict):
    urls: list[str] = Field(min_length=1)
    """Base URLs of equivalent servers (load balanced)."""
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


class OmniBackend(_Remote):
    kind: Literal["omni"]
    edit_size: Literal["input", "auto"] = "input"
    traced: bool = False
    """Ask the server for each image's diffusion transitions (``return_transitions``), so the
    draw/refine steps record what Flow-GRPO trains on (``atelier serve image`` answers it)."""


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
    adapter: str | None = None
    """LoRA adapter name to request (chat roles on openai / inprocess-lm backends)."""


class BackendsConfig(_Strict):
    backends: dict[str, BackendSpec] = Field(min_length=1)
    roles: dict[Role, str | RoleSpec]

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
            if spec.adapter and backend.kind not in ("openai", "inprocess-lm"):
                raise ValueError(f"roles.{role}: adapters need an openai or inprocess-lm backend")
        return self

    def role(self, role: str) -> RoleSpec | None:
        spec = self.roles.get(role)  # type: ignore[call-overload]
        if spec is None or isinstance(spec, RoleSpec):
            return spec
        return RoleSpec(backend=spec)


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


def _error_lines(error: ValidationError) -> list[str]:
    lines = []
    for e in error.errors():
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
    return f"{source}: invalid config:\n  " + "\n  ".join(_error_lines(error))


def parse_config(
    data: dict[str, Any], *, base: Path | None = None, source: str = "<config>"
) -> BackendsConfig:
    """Validate a config already read into a dict (``base``: where relative paths start)."""
    try:
        data = _expand(data, "")
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    _resolve_paths(data, base or Path.cwd())
    try:
        return BackendsConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None


def _toml() -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError("TOML configs need Python 3.11+ or tomli; or use JSON") from None
    return tomllib


def load_config(path: str | Path) -> BackendsConfig:
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
    return parse_config(data, base=path.parent, source=str(path))


# --- building ------------------------------------------------------------------------------------


def _token(spec: _Remote) -> str | None:
    if spec.token:
        return spec.token
    if spec.token_env:
        return os.environ.get(spec.token_env) or None
    return None


def _pool(spec: _Remote) -> Any:
    from nodes.backends.pool import RetryPolicy, ServerPool, Timeouts

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
        from nodes.backends.openai_client import OpenAIChatClient

        return OpenAIChatClient(
            model=spec.model,
            extra_body=spec.extra_body,
            legacy_token_ids=spec.legacy_token_ids,
            pool=_pool(spec),
        )
    if isinstance(spec, OmniBackend):
        from nodes.backends.omni_client import OmniImageClient

        return OmniImageClient(
            model=spec.model,
            extra_body=spec.extra_body,
            edit_size=spec.edit_size,
            pool=_pool(spec),
            traced=spec.traced,
        )
    if isinstance(spec, InProcessLMBackend):
        from nodes.backends.lm_inprocess import InProcessChatModel, LMService

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
            service.engine.load_adapter(adapter, path)
        return InProcessChatModel(service)
    if isinstance(spec, InProcessImageBackend) and spec.traced:
        from nodes.backends.flow.backend import FlowImageModel

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
        from nodes.backends.image_inprocess import InProcessImageModel

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


def _for_role(role: str, built: Any, spec: Any, role_spec: RoleSpec) -> Any:
    if isinstance(spec, ShapeWorldBackend):
        return getattr(built, role)
    if role_spec.adapter:
        built = built.with_adapter(role_spec.adapter)
    if role == "judge":
        from nodes.backends.vlm_judge import VLMJudge

        return VLMJudge(built)
    return built


def build_backends(config: BackendsConfig) -> dict[str, Any]:
    """``{role: backend}`` for every role (``judge`` is None when the config names none).

    Backends used by several roles are built once and shared (one connection pool, one model
    in memory). The dict's keys match :class:`agent_graph.context.Backends`' fields.
    """
    used = {spec.backend for spec in map(config.role, ROLES) if spec is not None}
    built = {name: build_backend(name, config.backends[name]) for name in sorted(used)}
    result: dict[str, Any] = {}
    for role in ROLES:
        role_spec = config.role(role)
        if role_spec is None:
            result[role] = None
            continue
        spec = config.backends[role_spec.backend]
        result[role] = _for_role(role, built[role_spec.backend], spec, role_spec)
    return result


def load_backends(path: str | Path) -> dict[str, Any]:
    """``build_backends(load_config(path))``."""
    return build_backends(load_config(path))
