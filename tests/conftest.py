"""Shared fixtures: ``store`` / ``db_url`` over SQLite and a private PostgreSQL server."""

pytest_plugins = ("tests.conftest_pg",)
