"""common.runs.newest_runs: finished runs by their end time, the newest run's group, broken runs skipped by name."""
import json
import os
import time

import pytest
from click.testing import CliRunner

from cnnbench.common.runs import newest_runs

NOW = time.time()
SPEC = {"resize": 110, "crop": 96}


def _age(path, seconds_ago):
    when = NOW - seconds_ago
    os.utime(path, (when, when), follow_symlinks=False)


def trained(folder, name, *, best_age, ended_age=None, data="/data/synth", classes=16, spec=SPEC):
    """A run folder: best.pt written ``best_age`` s ago; train.json (the end) ``ended_age`` s ago, None: unfinished."""
    run = folder / name
    run.mkdir(parents=True)
    (run / "best.pt").write_text("weights")
    _age(run / "best.pt", best_age)
    if ended_age is not None:
        (run / "train.json").write_text(json.dumps({"arch": name, "data": data, "classes": classes, "spec": spec}))
        _age(run / "train.json", ended_age)
    return str(run / "best.pt")


def exported(folder, name, *, age, classes=("a", "b"), spec=SPEC):
    run = folder / name
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"name": name, "classes": list(classes), "spec": spec}))
    _age(run / "manifest.json", age)
    return str(run)


def test_the_run_that_finished_last_wins_not_the_newest_best_pt(tmp_path, capsys):
    # best.pt is rewritten only when validation improves: a run that just finished may have an old one.
    trained(tmp_path / "train", "resnet26", best_age=60, ended_age=50)
    finished_last = trained(tmp_path / "demo" / "train", "xception", best_age=500, ended_age=10)
    sibling = trained(tmp_path / "demo" / "train", "resnet26", best_age=100, ended_age=90)
    found = newest_runs("train", root=str(tmp_path))
    assert found.folder == str(tmp_path / "demo" / "train")
    assert found.paths == [sibling, finished_last] and found.newest == finished_last and found.skipped == []
    assert f"using the newest trained runs in {found.folder}: resnet26, xception" in capsys.readouterr().err


def test_unfinished_and_broken_runs_are_skipped_by_name(tmp_path, capsys):
    folder = tmp_path / "train"
    good = trained(folder, "resnet26", best_age=100, ended_age=100)
    trained(folder, "training_now", best_age=1)  # no train.json yet: still training
    dangling = folder / "dangling"
    dangling.mkdir()
    (dangling / "best.pt").symlink_to(tmp_path / "gone.pt")
    (dangling / "train.json").write_text(json.dumps({"data": "/data/synth", "classes": 16, "spec": SPEC}))
    trained(folder, "garbled", best_age=5, ended_age=5)
    (folder / "garbled" / "train.json").write_text('{"arch": "resn')  # cut short
    found = newest_runs("train", root=str(tmp_path))
    assert found.paths == [good] and found.newest == good
    reasons = dict(found.skipped)
    assert reasons[str(folder / "training_now")].startswith("unfinished: no train.json")
    assert reasons[str(folder / "dangling")] == f"best.pt is a dangling link (to {tmp_path / 'gone.pt'})"
    assert reasons[str(folder / "garbled")].startswith("unreadable train.json")
    err = capsys.readouterr().err
    for name in ("training_now", "dangling", "garbled"):
        assert f"warning: skipped {folder / name}: " in err
    first = str(folder / "dangling")
    assert found.to_dict()["skipped"][0] == {"run": first, "reason": reasons[first]}


def test_only_the_newest_runs_group_is_used(tmp_path):
    # An ensemble of the folder's runs must not pull in older work on other data or classes.
    folder = tmp_path / "train"
    old = trained(folder, "old_caltech", best_age=9000, ended_age=9000, data="/data/caltech", classes=256)
    a = trained(folder, "resnet26", best_age=40, ended_age=30)
    b = trained(folder, "xception", best_age=25, ended_age=20)
    other_size = trained(folder, "resnet26_224", best_age=8000, ended_age=8000, spec={"resize": 256, "crop": 224})
    found = newest_runs("train", root=str(tmp_path), announce=False)
    assert found.paths == [a, b] and found.newest == b
    assert {run for run, _ in found.skipped} == {os.path.dirname(old), os.path.dirname(other_size)}
    assert all("other data, classes or preprocessing than the newest run" in why for _, why in found.skipped)


def test_exports_skip_broken_manifests_instead_of_reading_as_none(tmp_path, capsys):
    folder = tmp_path / "export"
    good = exported(folder, "resnet26", age=30)
    exported(folder, "ensemble-a+b", age=20, classes=("other", "classes"))
    broken = folder / "xception"
    broken.mkdir()
    (broken / "manifest.json").symlink_to(tmp_path / "nowhere.json")
    found = newest_runs("export", root=str(tmp_path))
    assert found.paths == [str(folder / "ensemble-a+b")] and found.newest == str(folder / "ensemble-a+b")
    reasons = dict(found.skipped)
    assert reasons[str(broken)].startswith("unreadable manifest.json (No such file or directory")
    assert "other data, classes or preprocessing" in reasons[good]
    assert "using the newest exports in" in capsys.readouterr().err


def test_no_finished_run_is_a_clear_error_naming_what_was_skipped(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished trained model found"):
        newest_runs("train", root=str(tmp_path / "empty"))
    trained(tmp_path / "train", "resnet26", best_age=5)
    with pytest.raises(FileNotFoundError, match=r"skipped .*resnet26: unfinished: no train.json"):
        newest_runs("train", root=str(tmp_path))


def test_export_and_bench_use_the_group_not_every_run_in_the_folder(tmp_path, monkeypatch):
    import cnnbench.bench
    import cnnbench.export
    from cnnbench.cli import cli

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "runs" / "demo" / "train"
    trained(folder, "resnet26", best_age=20, ended_age=20)
    trained(folder, "xception", best_age=10, ended_age=10)
    trained(folder, "unfinished", best_age=5)
    exported(tmp_path / "runs" / "export", "resnet26", age=3)
    calls = {}

    def export_checkpoints(checkpoints, **kwargs):
        calls["export"] = checkpoints
        return {"ok": True, "exports": []}

    def run_bench(models, **kwargs):
        calls["bench"] = models
        return {"ok": True, "rows": []}

    monkeypatch.setattr(cnnbench.export, "export_checkpoints", export_checkpoints)
    monkeypatch.setattr(cnnbench.bench, "run_bench", run_bench)
    runner = CliRunner()
    for command in (["export", "--json"], ["bench", "--json"]):
        result = runner.invoke(cli, command, catch_exceptions=False)
        assert result.exit_code == 0, result.output
    checkpoints = [os.path.join("runs", "demo", "train", name, "best.pt") for name in ("resnet26", "xception")]
    assert calls["export"] == checkpoints
    assert calls["bench"] == checkpoints + [os.path.join("runs", "export", "resnet26")]
