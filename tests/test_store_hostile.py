"""Hostile and careless inputs around the store and the CLI's files (issue #16): a store left in
its ``-wal`` file, crafted image references in an export, a password in an error line, an empty
``--db``, a read-only store, an output name the file system refuses, a backends file whose
server URL is not HTTP."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from nodes.backends.config import ConfigError, parse_config
from storage.images import InvalidImageRef
from storage.store import TrajectoryStore
from tests.cli_helpers import ATELIER, atelier_env, run_atelier

atelier = run_atelier

LONG_NAME = "n" * 300  # past NAME_MAX (255): ENAMETOOLONG


def one_error_line(result) -> str:  # a CompletedProcess -> its one `atelier: error:` line
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("atelier: error: "), result.stderr
    return lines[0]


def runs_in_copy(db: Path, tmp_path: Path) -> int:
    """Runs in a copy of the ``.db`` file alone (no ``-wal``, no ``-shm``)."""
    copy = tmp_path / "copy" / "alone.db"
    copy.parent.mkdir(exist_ok=True)
    shutil.copyfile(db, copy)
    with sqlite3.connect(copy) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0])


def assert_self_contained(db: Path) -> None:
    wal = Path(f"{db}-wal")
    assert not wal.exists() or wal.stat().st_size == 0, f"{wal}: {wal.stat().st_size} bytes"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """A store with one small recorded run (9 ShapeWorld trajectories), read-only to tests:
    each copies it (every file of it, so that the copy is whole before the fix too)."""
    db = tmp_path_factory.mktemp("recorded") / "w.db"
    result = atelier("rollout", "--per-category", "1", "-G", "1", "--name", "small", db=db)
    assert result.returncode == 0, result.stderr
    return db


def copy_store(db: Path, where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    for file in db.parent.glob(f"{db.name}*"):
        shutil.copyfile(file, where / file.name)
    return where / db.name


# --- 1. the .db file alone holds the data once a command has exited ------------------------


def test_a_clean_cli_exit_leaves_the_data_in_the_db_file(tmp_path):
    db = tmp_path / "w.db"
    result = atelier("rollout", "--per-category", "1", "-G", "1", "--name", "wal", db=db)
    assert result.returncode == 0, result.stderr
    assert_self_contained(db)
    assert runs_in_copy(db, tmp_path) == 1
    # a command that only reads, and one that writes files, leave it so too
    for command in (["runs"], ["export", "--out", str(tmp_path / "e.jsonl")]):
        result = atelier(*command, db=db)
        assert result.returncode == 0, result.stderr
        assert_self_contained(db)
    assert runs_in_copy(db, tmp_path) == 1


def test_closing_the_store_checkpoints_while_another_connection_holds_the_file(tmp_path):
    """SQLite folds the WAL back by itself only when its last connection closes; a viewer or a
    second process holding the file open must not leave the rows in ``-wal``."""
    db = tmp_path / "w.db"
    with TrajectoryStore(f"sqlite:///{db}") as store:
        store.create_run("first")
    other = sqlite3.connect(db)  # idle, as a viewer between two reads
    try:
        assert other.execute("SELECT COUNT(*) FROM runs").fetchone() == (1,)
        store = TrajectoryStore(f"sqlite:///{db}")
        store.create_run("second")
        store.close()
        assert_self_contained(db)
        assert runs_in_copy(db, tmp_path) == 2
    finally:
        other.close()


# --- 2. export: every file and every path it writes lies inside its folder -----------------


def _craft_refs(db: Path, refs: list[str]) -> None:
    """Give trajectories and a step image the references ``refs`` (as a hostile database
    would), with an ``images`` row for the step's, so that the store lists it."""
    with sqlite3.connect(db) as conn:
        ids = [row[0] for row in conn.execute("SELECT id FROM trajectories ORDER BY id")]
        for trajectory_id, ref in zip(ids, refs, strict=False):
            conn.execute(
                "UPDATE trajectories SET final_image = ? WHERE id = ?", (ref, trajectory_id)
            )
        columns = [row[1] for row in conn.execute("PRAGMA table_info(images)")]
        others = ", ".join(c for c in columns if c != "sha256")
        conn.execute(
            f"INSERT INTO images (sha256, {others}) SELECT ?, {others} FROM images LIMIT 1",
            (refs[0],),
        )
        conn.execute(
            "UPDATE step_images SET ref = ? WHERE rowid = (SELECT MIN(rowid) FROM step_images)",
            (refs[0],),
        )


def _paths(value) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "path" and isinstance(item, str):
                yield item
            else:
                yield from _paths(item)
    elif isinstance(value, list):
        for item in value:
            yield from _paths(item)


def test_export_files_never_land_or_point_outside_the_export_folder(recorded, tmp_path):
    db = copy_store(recorded, tmp_path / "store")
    out = tmp_path / "out"
    out.mkdir()

    def outside() -> set[Path]:  # files neither the export's nor the store's
        return {p for p in tmp_path.rglob("*") if not {out, db.parent} & set(p.parents)}

    # Files the crafted names would reach: tmp/victim.png, tmp/abs.png.
    (tmp_path / "victim.png").write_bytes(b"victim")
    (tmp_path / "abs.png").write_bytes(b"absolute")
    crafted = ["../../victim", str(tmp_path / "abs")]
    _craft_refs(db, crafted)
    before = outside()

    result = atelier("export", "--out", str(out / "e.jsonl"), "--images", "files", db=db)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    records = [json.loads(line) for line in (out / "e.jsonl").read_text().splitlines()]
    paths = [path for record in records for path in _paths(record)]
    assert paths, "the export wrote no image path at all"
    for path in paths:
        assert out.resolve() in (out / path).resolve().parents, path
    finals = [r["final_image"] for r in records if r["final_image"]]
    refused = [image for image in finals if image["ref"] in crafted]
    assert len(refused) == 2 and all(i["path"] is None and i["missing"] for i in refused)
    assert outside() == before
    assert (tmp_path / "victim.png").read_bytes() == b"victim"


def test_blob_reads_never_leave_the_image_directory(tmp_path):
    """A reference read from the database names a file under ``image_dir`` only when it is a
    sha256: a crafted one is refused before it touches a path."""
    (tmp_path / "secret.png").write_bytes(b"secret")
    with TrajectoryStore(f"sqlite:///{tmp_path / 'w.db'}", image_dir=str(tmp_path / "blobs")) as s:
        for ref in ("../secret", str(tmp_path / "secret"), "../" * 3 + "etc/passwd"):
            with pytest.raises(InvalidImageRef):
                s.image_bytes(ref)
            assert ref not in s


# --- 3. no password in an error line -------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("command", [["runs"], ["ls"], ["rollout", "--per-category", "1"]])
def test_a_database_password_never_appears_in_an_error(command):
    url = f"postgresql://atelier:s3cret@127.0.0.1:{_closed_port()}/atelier"
    result = atelier(*command, "--db", url)
    assert result.returncode == 2, result.stderr
    line = one_error_line(result)
    assert "s3cret" not in result.stderr + result.stdout
    assert "atelier:***@127.0.0.1" in line  # the URL is still named, masked


# --- 4. an empty --db -----------------------------------------------------------------------


@pytest.mark.parametrize("command", [["runs"], ["rollout", "--per-category", "1", "-G", "1"]])
def test_an_empty_db_option_is_an_error_not_the_default_store(command, tmp_path):
    result = atelier(*command, "--db", "", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "--db is empty" in one_error_line(result)
    assert not (tmp_path / "atelier.db").exists()


# --- 5. a read-only store --------------------------------------------------------------------


def _shared_dir() -> Path:
    """A folder an unprivileged user can enter (pytest's tmp_path is the owner's only)."""
    path = Path(tempfile.mkdtemp(prefix="atelier-ro-"))
    path.chmod(0o755)
    return path


def _as_nobody() -> list[str]:
    """A prefix running a command without root's right to write anything (root ignores file
    modes); empty when not root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file modes do not bind root")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


ROLLOUT = ("rollout", "--per-category", "1", "-G", "1", "--name", "ro2")


def _record(db: str, cwd: Path, prefix: Sequence[str] = (), command: Sequence[str] = ROLLOUT):
    import subprocess

    return subprocess.run(
        [*prefix, *ATELIER, *command],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=atelier_env(db),
    )


def _assert_read_only_error(result) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    line = one_error_line(result)
    assert "read-only" in line, line
    assert "resume" not in line, line  # no run was created: nothing to resume


@pytest.mark.parametrize("how", ["uri", "file", "folder", "demo"])
def test_a_read_only_store_says_so_and_offers_no_resume(how):
    folder = _shared_dir()
    try:
        db = folder / "ro.db"
        TrajectoryStore(f"sqlite:///{db}").close()  # a store with its schema, and no run
        read_only_url = f"sqlite:///file:{db}?mode=ro&uri=true"  # the same for root
        if how == "uri":
            result = _record(read_only_url, folder)
        elif how == "demo":
            result = _record(read_only_url, folder, command=["demo", "--per-category", "1"])
        elif how == "file":
            folder.chmod(0o777)  # the folder writable: only the file is read-only
            db.chmod(0o444)
            result = _record(str(db), folder, _as_nobody())
        else:
            db.chmod(0o666)  # the file writable, its folder not: no -wal can be created
            folder.chmod(0o555)
            result = _record(str(db), folder, _as_nobody())
        _assert_read_only_error(result)
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder, ignore_errors=True)


# --- 6. an output name the file system refuses -----------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["run", "a red circle", "--out", f"{LONG_NAME}.png"],
        ["demo", "--per-category", "1", "--no-record", "--markdown", f"{LONG_NAME}.md"],
        ["export", "--out", f"{LONG_NAME}.jsonl"],
        ["view", "small", "--out", f"{LONG_NAME}.html"],
        # policy versions are saved under --out (a folder): refused before any rollout
        ["train", "--world", "shapeworld", "--per-category", "1", "-G", "2", "--out", LONG_NAME],
    ],
    ids=["run", "demo", "export", "view", "train"],
)
def test_an_output_name_too_long_is_one_error_line(command, recorded, tmp_path):
    db = copy_store(recorded, tmp_path / "store")
    result = atelier(*command, db=db, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    line = one_error_line(result)
    assert "name too long" in line.lower() and LONG_NAME in line


# --- 7. server URLs in a backends file ---------------------------------------------------------

ROLES = {"planner": "a", "reflector": "a", "decomposer": "a", "generator": "b", "editor": "b"}


@pytest.mark.parametrize("url", ["ftp://10.0.0.5:8000", "not a url", "http://", "10.0.0.5:8000"])
def test_a_server_url_must_be_http_or_https_with_a_host(url):
    data = {
        "backends": {
            "a": {"kind": "openai", "urls": ["http://127.0.0.1:9", url]},
            "b": {"kind": "omni", "urls": ["https://images.example:443/v1"]},
        },
        "roles": ROLES,
    }
    with pytest.raises(ConfigError, match=r"backends\.a\.urls\.1: .*not a server URL"):
        parse_config(data, source="b.toml")


def test_a_bad_server_url_is_one_cli_error_line(tmp_path):
    config = tmp_path / "b.toml"
    config.write_text(
        '[backends.a]\nkind = "openai"\nurls = ["ftp://10.0.0.5:8000"]\n\n'
        '[backends.b]\nkind = "omni"\nurls = ["http://127.0.0.1:9"]\n\n'
        "[roles]\n" + "".join(f'{role} = "{name}"\n' for role, name in ROLES.items())
    )
    result = atelier("run", "a red circle", "--no-record", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert "backends.a.urls.0" in one_error_line(result)
