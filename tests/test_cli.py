"""The command line: user errors are one line and exit 2, a bug keeps its traceback; --data means one thing."""
import sys

import click
import pytest

from cnnbench import cli
def _run(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["cnnbench", *argv])
    cli.main()


def test_a_user_error_is_one_line_and_exit_code_2(monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        _run(monkeypatch, "data", "synth", "--out", str(tmp_path / "set"), "--classes", "0")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: classes must be between 1 and") and err.count("\n") == 1


@pytest.mark.parametrize("bug", [ValueError("an internal invariant broke"), OSError("a disk went away")])
def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path, bug):
    """ValueError and OSError raised by the program itself are not the user's mistake: they propagate."""
    from cnnbench import data
    import cnnbench.data.check  # noqa: F401  (loads the submodule)
    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(data.check, "check_folder", broken)
    with pytest.raises(type(bug), match=str(bug)):
        _run(monkeypatch, "data", "check", str(tmp_path))


def _commands(group: click.Group, prefix=""):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def test_every_held_out_data_option_says_the_same():
    """eval, export, validate, bench, mlperf and gradcam pick held-out images with one function: one help text."""
    helps = {name: next(p.help for p in command.params if p.name == "data")
             for name, command in _commands(cli.cli) if name != "train" and any(p.name == "data" for p in command.params)}
    assert set(helps) == {"eval", "export", "validate", "bench", "mlperf", "gradcam"}
    assert len(set(helps.values())) == 1, helps
    assert "seed-0 split" in helps["eval"] and "test part" in helps["eval"]


def test_the_cnnbench_console_command_is_this_cli(monkeypatch, capsys):
    import importlib
    import tomllib
    from pathlib import Path

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["cnnbench"].split(":")
    entry = getattr(importlib.import_module(module), function)
    assert entry is cli.main
    monkeypatch.setattr(sys, "argv", ["cnnbench", "--help"])
    entry()  # click's --help returns normally under standalone_mode=False
    out = capsys.readouterr().out
    assert out.startswith("Usage: ") and "[OPTIONS] COMMAND" in out and "validate" in out and "bench" in out
