"""Session fixtures over the tiny random-weight models of :mod:`nodes.backends.engines.tiny_models`.

The builders live in the installed package (``atelier tiny-models DIR`` builds a folder for
``examples/configs/tiny-models.toml``; tests import them from there). Every test module sees
these fixtures (``tests/conftest.py`` loads this module as a plugin).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nodes.backends.engines.tiny_models import (
    TORCH_THREADS,
    TinyModels,
    build_all,
    build_flux,
    build_qwen2_vl,
    build_sd3,
)

_BUILT: dict[str, Any] = {}


def _once(key: str, build: Any) -> Any:
    if key not in _BUILT:
        _BUILT[key] = build()
    return _BUILT[key]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """Every tiny model, built once per test session (import this fixture into a module)."""
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    return _once("models", lambda: build_all(tmp_path_factory.mktemp("tiny-models")))


@pytest.fixture(scope="session")
def vlm_service(tiny_models: TinyModels) -> Any:
    """The tiny VLM, loaded once, served in batches of up to 8 (collected for 20 ms)."""
    from nodes.backends.engines.lm_inprocess import LMService

    return _once(
        "vlm_service",
        lambda: LMService.from_pretrained(
            tiny_models.vlm, name="tiny-vlm", max_wait_ms=20, torch_threads=TORCH_THREADS
        ),
    )


@pytest.fixture(scope="session")
def image_service(tiny_models: TinyModels) -> Any:
    from nodes.backends.engines.image_inprocess import ImageService

    return _once(
        "image_service",
        lambda: ImageService.from_pretrained(
            tiny_models.sd,
            edit_model_dir=tiny_models.ip2p,
            name="tiny-sd",
            default_steps=2,
            max_wait_ms=30,
            torch_threads=TORCH_THREADS,
        ),
    )


@pytest.fixture(scope="module")
def text_lm(tiny_models: TinyModels) -> Any:
    """``atelier serve lm`` for the tiny text LM (Qwen2, ChatML) on a free loopback port, and
    its service: one per test module (a module may load adapters into it)."""
    from nodes.backends.engines.lm_inprocess import LMService
    from nodes.backends.servers.http_common import BackgroundServer
    from nodes.backends.servers.lm_server import create_lm_app

    service = LMService.from_pretrained(
        tiny_models.lm, name="tiny-lm", max_wait_ms=20, torch_threads=TORCH_THREADS
    )
    server = BackgroundServer(create_lm_app(service)).start()
    yield server, service
    server.stop()
    service.close()


@pytest.fixture(scope="module")
def text_lm_replicas(text_lm: Any, tiny_models: TinyModels) -> Any:
    """Two ``atelier serve lm`` replicas of the tiny text LM (the module's ``text_lm`` and one
    more): (servers, services)."""
    from nodes.backends.engines.lm_inprocess import LMService
    from nodes.backends.servers.http_common import BackgroundServer
    from nodes.backends.servers.lm_server import create_lm_app

    first_server, first_service = text_lm
    service = LMService.from_pretrained(
        tiny_models.lm, name="tiny-lm", max_wait_ms=20, torch_threads=TORCH_THREADS
    )
    server = BackgroundServer(create_lm_app(service)).start()
    yield [first_server, server], [first_service, service]
    server.stop()
    service.close()


SERVER_LIMITS = {"max_body_bytes": 1024 * 1024, "max_image_pixels": 256 * 256}


@pytest.fixture(scope="session")
def lm_server(vlm_service: Any) -> Any:
    """``atelier serve lm`` for the tiny VLM on a free loopback port (no token)."""
    from nodes.backends.servers.http_common import BackgroundServer, ServerLimits
    from nodes.backends.servers.lm_server import create_lm_app

    def start() -> Any:
        app = create_lm_app(vlm_service, limits=ServerLimits(**SERVER_LIMITS))
        return BackgroundServer(app).start()

    return _once("lm_server", start)


@pytest.fixture(scope="session")
def image_server(image_service: Any) -> Any:
    """``atelier serve image`` for tiny SD + InstructPix2Pix on a free loopback port."""
    from nodes.backends.servers.http_common import BackgroundServer, ServerLimits
    from nodes.backends.servers.image_server import create_image_app

    def start() -> Any:
        app = create_image_app(image_service, limits=ServerLimits(**SERVER_LIMITS))
        return BackgroundServer(app).start()

    return _once("image_server", start)


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD3 pipeline directory, built once per test session."""
    pytest.importorskip("diffusers")
    return _once("sd3", lambda: build_sd3(tmp_path_factory.mktemp("tiny-sd3")))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Flux pipeline directory, built once per test session."""
    pytest.importorskip("diffusers")
    return _once("flux", lambda: build_flux(tmp_path_factory.mktemp("tiny-flux")))


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2-VL directory (multimodal rotary positions), built once per test session."""
    pytest.importorskip("transformers")
    return _once("qwen2_vl", lambda: build_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl")))


if __name__ == "__main__":  # pragma: no cover - the old spelling of `atelier tiny-models DIR`
    import sys

    print(build_all(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/atelier-tiny")))
