"""A saved policy version is never overwritten: repeated `atelier train` runs in one store take
free versions, write them atomically, and keep the store and the files in agreement."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from atelier.cli import main
from policies.mode import LearnedModePolicy
from policies.weights import CONFIG_FILE, WEIGHTS_FILE, load_policy
from storage.store import TrajectoryStore
from training.decisions.trainer import GRPOTrainer
from training.versions import VersionTaken, reserve_versions, save_version, taken_versions

TRAIN = ["train", "--world", "shapeworld", "--iterations", "1", "--per-category", "1", "-G", "2"]


def digests(directory: Path) -> dict[str, str]:
    return {
        f"{p.parent.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.glob("*/*"))
    }


def assert_store_and_files_agree(store: TrajectoryStore) -> None:
    for info in store.policy_versions(name="router"):
        config = json.loads((Path(info.path) / CONFIG_FILE).read_text())
        assert (config["name"], config["version"]) == (info.name, info.version)
        assert (Path(info.path) / WEIGHTS_FILE).is_file()


def test_a_second_train_with_changed_arguments_takes_new_versions_and_overwrites_nothing(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    db = f"sqlite:///{tmp_path / 'a.db'}"
    assert main([*TRAIN, "--db", db]) == 0
    first = digests(tmp_path / "atelier-policies")
    assert list(first) == ["router-1/config.json", "router-1/model.safetensors"]

    # The steps the review took: same store, another seed, then another --out.
    assert main([*TRAIN, "--seed", "1", "--db", db]) == 0
    assert main([*TRAIN, "--out", "elsewhere", "--db", db]) == 0
    after = digests(tmp_path / "atelier-policies")
    assert {k: after[k] for k in first} == first  # router-1 untouched
    store = TrajectoryStore(db)
    versions = [v.version for v in store.policy_versions(name="router")]
    assert len(versions) == len(set(versions)) == 3
    assert_store_and_files_agree(store)
    assert not list(tmp_path.glob("**/.*.tmp"))  # no staging directory left behind
    capsys.readouterr()


def test_training_from_a_loaded_version_whose_successor_exists_is_refused_before_any_rollout(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    db = f"sqlite:///{tmp_path / 'a.db'}"
    assert main([*TRAIN, "--iterations", "2", "--db", db]) == 0  # router-1, router-2
    runs_before = len(TrajectoryStore(db).runs())
    capsys.readouterr()
    code = main([*TRAIN, "--init", "atelier-policies/router-1", "--db", db])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("atelier: error: router@2") and "already exists" in err[0]
    assert len(TrajectoryStore(db).runs()) == runs_before  # refused before rolling out


@pytest.mark.parametrize("init", ["/nonexistent/router-9", "not-a-policy"])
def test_train_init_that_is_not_a_policy_is_one_error_line(tmp_path, monkeypatch, capsys, init):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "not-a-policy").mkdir()
    (tmp_path / "not-a-policy" / CONFIG_FILE).write_text("{not json")
    code = main([*TRAIN, "--init", init, "--db", f"sqlite:///{tmp_path / 'a.db'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"atelier: error: --init {init}")


def test_save_refuses_an_existing_directory_and_leaves_it_as_it_was(tmp_path):
    policy = LearnedModePolicy(seed=0)
    path = policy.save(tmp_path / "router-0")
    before = digests(tmp_path)
    with torch.no_grad():
        next(policy.net.parameters()).add_(1.0)
    with pytest.raises(FileExistsError, match="never overwritten"):
        policy.save(path)
    assert digests(tmp_path) == before
    assert not list(tmp_path.glob(".*"))


def test_a_failed_registration_removes_the_files_it_wrote(tmp_path):
    store = TrajectoryStore(f"sqlite:///{tmp_path / 'a.db'}")
    policy = LearnedModePolicy(seed=0)
    trainer = GRPOTrainer(policy)
    save_version(trainer, store, tmp_path / "v" / "router-0")
    with pytest.raises(VersionTaken):  # same version again: refused before writing
        save_version(trainer, store, tmp_path / "w" / "router-0")
    assert not (tmp_path / "w" / "router-0").exists()
    loaded = load_policy(tmp_path / "v" / "router-0")
    assert loaded.version == policy.version

    # Registering itself fails after the files are written: they are removed again.
    def refuse(*args, **kwargs):
        raise RuntimeError("the store went away")

    store.register_policy_version = refuse  # type: ignore[method-assign]
    trainer.policy.version = "1"
    with pytest.raises(RuntimeError, match="went away"):
        save_version(trainer, store, tmp_path / "x" / "router-1")
    assert not (tmp_path / "x" / "router-1").exists()
    assert not list((tmp_path / "x").iterdir())  # no staging directory left behind either


@pytest.mark.parametrize("kind", ["decisions", "lora"])
def test_save_version_refuses_an_existing_directory_before_writing(tmp_path, kind):
    store = TrajectoryStore(f"sqlite:///{tmp_path / 'a.db'}")
    target = tmp_path / "out" / "v1"
    target.mkdir(parents=True)
    (target / "keep.txt").write_text("mine")
    trainer = GRPOTrainer(LearnedModePolicy(seed=0)) if kind == "decisions" else _FakeLoRA()
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_version(trainer, store, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert store.policy_versions() == []


class _FakeLoRA:
    """A trainer that writes its files with ``write_new_directory``, as the LoRA kinds do."""

    name, version = "planner", "1"

    def save(self, directory):
        from policies.weights import write_new_directory

        return write_new_directory(directory, lambda path: (path / "w.bin").write_bytes(b"w"))

    def describe(self):
        return {"kind": "fake"}


def test_write_new_directory_is_atomic_and_never_overwrites(tmp_path):
    from policies.weights import write_new_directory

    def fail(path: Path) -> None:
        (path / "half.bin").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_new_directory(tmp_path / "v1", fail)
    assert list(tmp_path.iterdir()) == []  # neither the version nor its staging directory
    store = TrajectoryStore(f"sqlite:///{tmp_path / 'a.db'}")
    path = save_version(_FakeLoRA(), store, tmp_path / "v1", {"loss": float("nan")})
    assert (path / "w.bin").read_bytes() == b"w"
    (info,) = store.policy_versions(name="planner")
    assert info.metadata == {"kind": "fake", "loss": None}  # JSON has no nan
    with pytest.raises(FileExistsError):
        write_new_directory(path, lambda p: None)


def test_reserve_versions_relabels_fresh_policies_past_store_and_disk(tmp_path):
    store = TrajectoryStore(f"sqlite:///{tmp_path / 'a.db'}")
    store.register_policy_version("router", "1", path="x")
    (tmp_path / "out" / "router-3").mkdir(parents=True)  # on disk only (another store)
    taken = taken_versions(store, "router", tmp_path / "out")
    assert set(taken) == {"1", "3"}
    fresh = LearnedModePolicy(seed=0)  # version "0"; 2 iterations produce 1, 2 -> collide
    reserved = reserve_versions(fresh, taken, 2, loaded=False)
    # 0 -> produces 1 (taken); 1, 2 -> produce 3 (taken); 3 is taken; 4 -> produces 5, 6.
    assert reserved.version == "4" and reserved.name == "router"
    assert reserve_versions(fresh, {}, 2, loaded=False) is fresh
