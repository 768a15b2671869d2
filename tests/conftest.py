"""Shared fixtures (``store`` / ``db_url`` over SQLite and a private PostgreSQL server) and the
markers that let a developer run a fast loop: ``make test-fast`` deselects ``slow``,
``postgres`` and ``models``; ``make test`` (and CI) runs everything."""

from __future__ import annotations

import pytest

pytest_plugins = ("tests.conftest_pg",)

MODEL_FIXTURES = {
    "tiny_models",
    "vlm_service",
    "image_service",
    "lm_server",
    "image_server",
    "tiny_sd3",
    "tiny_flux",
}
"""Fixtures that build tiny transformers / diffusers models."""

MODEL_MODULES = {
    "test_backends_config",
    "test_backends_graph",
    "test_backends_image",
    "test_backends_lm",
    "test_flow_flux",
    "test_flow_sde",
    "test_flow_server",
    "test_flow_store",
    "test_flow_training",
    "test_policies_learned",
    "test_training_lora",
}
"""Modules whose tests load transformers, diffusers, peft or a sentence encoder."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "postgresql" in params.values() or fixtures & {"pg_server", "postgres"}:
            item.add_marker(pytest.mark.postgres)
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if fixtures & MODEL_FIXTURES or module in MODEL_MODULES or module.startswith("test_tiny"):
            item.add_marker(pytest.mark.models)
