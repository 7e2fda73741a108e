"""`mamlpp data ...` through the real entry point: info --json, import, fetch, and user errors
as one line with exit code 2."""

from __future__ import annotations

import json
import sys

import pytest

from mamlpp_tui import cli
from tests.data_fixtures import MINI_SAMPLE, needs_mini_sample


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["mamlpp", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLPP_HOME", str(tmp_path))
    return tmp_path


def test_info_json_on_an_empty_cache(home, monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "data", "info", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["root"] == str(home / "data")
    assert report["datasets"] == []
    assert {m["name"]: m["command"] for m in report["missing"]} == {
        "omniglot": "mamlpp data fetch omniglot",
        "miniimagenet": "mamlpp data import miniimagenet PATH",
        "quickstart": "mamlpp data fetch quickstart"}


@needs_mini_sample
def test_import_then_info_lists_counts_per_split(home, monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "data", "import", "miniimagenet",
                           str(MINI_SAMPLE))
    assert code == 0
    assert "import mini-ImageNet: done (600 images" in out  # plain progress lines (no TTY)
    assert "miniimagenet cached in" in out
    code, out, _ = run_cli(monkeypatch, capsys, "data", "fetch", "quickstart")
    assert code == 0 and "quickstart cached in" in out
    code, out, _ = run_cli(monkeypatch, capsys, "data", "info", "--json")
    report = json.loads(out)
    by_name = {d["name"]: d for d in report["datasets"]}
    assert set(by_name) == {"miniimagenet", "quickstart"}
    assert by_name["miniimagenet"]["splits"] == {
        "train": {"classes": 64, "per_class": 6, "images": 384},
        "val": {"classes": 16, "per_class": 6, "images": 96},
        "test": {"classes": 20, "per_class": 6, "images": 120}}
    assert by_name["miniimagenet"]["image_shape"] == [3, 84, 84]
    assert by_name["miniimagenet"]["split"]["method"] == "ravi"  # the sample's 16 + 20 wnids
    assert by_name["quickstart"]["splits"]["train"] == {"classes": 2000, "per_class": 20,
                                                        "images": 40000}
    assert [m["name"] for m in report["missing"]] == ["omniglot"]
    code, out, _ = run_cli(monkeypatch, capsys, "data", "info")
    assert code == 0 and "miniimagenet" in out and "40,000" in out
    assert "omniglot: not cached; get it with `mamlpp data fetch omniglot`." in out
    assert "miniimagenet classes: the standard Ravi & Larochelle split" in " ".join(out.split())


@pytest.mark.parametrize("args, expected", [
    (("data", "import", "miniimagenet", "/nonexistent/mini"), "/nonexistent/mini does not exist"),
    (("data", "fetch", "miniimagenet"), "`mamlpp data import miniimagenet PATH`"),
    (("data", "fetch", "cifar"), "Unknown dataset 'cifar'"),
    (("data", "import", "quickstart", "."), "quickstart is built in"),
    (("data", "fetch", "omniglot", "--from", "/nonexistent/omni"), "does not exist"),
])
def test_user_errors_are_one_line_and_exit_2(home, monkeypatch, capsys, args, expected):
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert expected in lines[0]
    assert not (home / "data" / "miniimagenet").exists()
