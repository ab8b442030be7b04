"""Faults and abuse: every case ends in its exit code and one line, and leaves the paths around it as they were."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.models import tiny_torrent
from tests.test_quantize_engine import tiny_hf


def tree(path: Path) -> dict[str, str]:
    """Every file under `path` with the sha256 of its bytes: what must not change."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def one_line_error(result, code: int, says: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert says in result.stderr and result.stderr.count("\n") == 1, result.stderr


# ---- an output may never equal, contain or lie inside an input (with --force it would delete it) ------------

@pytest.mark.parametrize("where, says", [(".", "the output contains the input"),
                                         ("src", "the output is the input"),
                                         ("src/out", "the output lies inside the input")])
def test_convert_never_replaces_its_source(cli, tmp_path, where, says):
    src = tiny_torrent(tmp_path / "src")
    before = tree(tmp_path)
    result = cli("convert", src, tmp_path / where, "--to", "hf", "--force")
    one_line_error(result, 1, says)
    assert tree(tmp_path) == before


def test_convert_through_a_symlink_to_the_source_is_refused(cli, tmp_path):
    src = tiny_torrent(tmp_path / "src")
    (tmp_path / "link").symlink_to(src)
    before = tree(tmp_path)
    one_line_error(cli("convert", src, tmp_path / "link", "--to", "hf", "--force"), 1, "the output is the input")
    assert tree(tmp_path) == before and (tmp_path / "link").is_symlink()


@pytest.mark.parametrize("where, says", [("m", "the output is the input"), (".", "the output contains the input")])
def test_quantize_never_replaces_its_model(cli, tmp_path, where, says):
    model = tiny_hf(tmp_path / "m")
    before = tree(tmp_path)
    one_line_error(cli("quantize", "rtn", model, tmp_path / where if where != "m" else model, "--force"), 1, says)
    assert tree(tmp_path) == before


# ---- numbers that make no sense are usage errors, before any work -------------------------------------------

@pytest.mark.parametrize("args", [["quantize", "gptq", "{m}", "{out}", "--samples", "0"],
                                  ["quantize", "gptq", "{m}", "{out}", "--samples", "-1"],
                                  ["quantize", "gptq", "{m}", "{out}", "--seqlen", "-1"],
                                  ["quantize", "gptq", "{m}", "{out}", "--damp", "-1"],
                                  ["quantize", "rtn", "{m}", "{out}", "--group-size", "0"],
                                  ["quantize", "rtn", "{m}", "{out}", "--batch", "0"],
                                  ["quantize", "awq", "{m}", "{out}", "--grid", "0"],
                                  ["check", "{m}", "--seqlen", "0"],
                                  ["check", "{m}", "--eval-batch", "0"],
                                  ["check", "{m}", "--max-new-tokens", "-1"]])
def test_nonsense_numbers_are_usage_errors(cli, tmp_path, args):
    model = tiny_hf(tmp_path / "m")
    before = tree(tmp_path)
    result = cli(*[a.format(m=model, out=tmp_path / "out") for a in args])
    assert result.exit_code == 2 and "Invalid value" in result.stderr, result.stderr
    assert tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["m"]
