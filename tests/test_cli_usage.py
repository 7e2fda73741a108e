"""Usage errors of every command: one line on stderr starting `error:`, exit code 2, no
traceback, whatever typer version is installed (click's exceptions up to typer 0.28, typer's
vendored copy from 0.29).

The commands are walked from the CLI's own command tree, so a command added later is covered
without touching this file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer

from mamlpp_tui import cli
from tests.helpers import one_line_error, run_main


def _commands(group=None, path=()):
    """(path, click-like command) of every leaf command under the app."""
    group = group or typer.main.get_command(cli.app)
    for name, command in sorted(getattr(group, "commands", {}).items()):
        if getattr(command, "commands", None):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


COMMANDS = list(_commands())


def _required_arguments(command) -> int:
    return sum(1 for p in command.params
               if type(p).__name__.endswith("Argument") and p.required)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLPP_HOME", str(tmp_path))
    return tmp_path


def test_every_command_is_walked():
    names = {" ".join(p) for p, _ in COMMANDS}
    assert {"run", "resume", "ensemble", "runs", "show", "watch", "presets", "bench",
            "data import", "data info", "data fetch"} <= names


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=" ".join)
def test_unknown_flag(path, monkeypatch, capsys):
    code, out, err = run_main(capsys, *path, "--no-such-flag")
    one_line_error(code, err)
    assert "--no-such-flag" in err and f"mamlpp {' '.join(path)} --help" in err
    assert out == ""


@pytest.mark.parametrize("path", [p for p, c in COMMANDS if _required_arguments(c)],
                         ids=" ".join)
def test_missing_argument(path, monkeypatch, capsys):
    code, _, err = run_main(capsys, *path)
    one_line_error(code, err)
    assert "Missing argument" in err


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=" ".join)
def test_too_many_arguments(path, monkeypatch, capsys):
    command = dict(COMMANDS)[path]
    extra = ["x"] * (_required_arguments(command) + 5)
    code, _, err = run_main(capsys, *path, *extra)
    one_line_error(code, err)


@pytest.mark.parametrize("path", [p for p, c in COMMANDS
                                  if any("--device" in p.opts for p in c.params)],
                         ids=" ".join)
def test_bad_device_is_refused_before_any_work(path, monkeypatch, capsys):
    command = dict(COMMANDS)[path]
    args = ["x"] * _required_arguments(command)
    code, _, err = run_main(capsys, *path, *args, "--device", "tpu9")
    one_line_error(code, err)
    assert "'tpu9' is not a device" in err


@pytest.mark.parametrize("argv, needle", [
    (["nosuch"], "No such command 'nosuch'"),
    (["data", "nosuch"], "No such command 'nosuch'"),
    (["ensemble", "x", "--top-k", "0"], "--top-k"),
    (["ensemble", "x", "--top-k", "many"], "--top-k"),
    (["bench", "--iters", "x"], "--iters"),
    (["run", "--set"], "--set"),
])
def test_bad_values(argv, needle, monkeypatch, capsys):
    code, _, err = run_main(capsys, *argv)
    one_line_error(code, err)
    assert needle in err


def test_bare_group_prints_its_help(monkeypatch, capsys):
    code, out, err = run_main(capsys, "data")
    assert code == 0 and "fetch" in out + err and "Traceback" not in out + err


@pytest.mark.parametrize("argv", [["run", "--bogus"], ["nosuch"], ["run", "--device", "tpu9"],
                                  ["resume"]])
def test_console_entry_point_in_a_fresh_process(argv, tmp_path):
    """What a user types, through the installed entry point's module (`python -m`)."""
    env = dict(os.environ, MAMLPP_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "mamlpp_tui", *argv], env=env, text=True,
                          capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    one_line_error(proc.returncode, proc.stderr)
    assert proc.stdout == ""
