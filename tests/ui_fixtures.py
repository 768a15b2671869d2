"""The trace UI's test fixtures (``pytest_plugins = ("tests.ui_fixtures",)``), shared by the
HTTP and browser tests so the store is built once per session: ``ui_built`` (its URL and the
ids ``tests/ui_store.py`` reports), ``ui_store`` (open on it), ``ui_base`` (the app served on
loopback, its base URL)."""

from __future__ import annotations

import pytest

from atelier.ui.app import create_app
from storage.store import TrajectoryStore
from tests.ui_server import serving
from tests.ui_store import UIStoreIds, build_ui_store


@pytest.fixture(scope="session")
def ui_built(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, UIStoreIds]:
    folder = tmp_path_factory.mktemp("ui")
    url = f"sqlite:///{folder / 'atelier.db'}"
    return url, build_ui_store(url, folder / "versions")


@pytest.fixture(scope="session")
def ui_store(ui_built):
    store = TrajectoryStore(ui_built[0])
    yield store
    store.close()


@pytest.fixture(scope="session")
def ui_base(ui_store):
    with serving(create_app(ui_store)) as url:
        yield url
