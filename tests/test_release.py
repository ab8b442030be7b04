"""The release pipeline of the Makefile on a tiny model: the tree, model cards whose numbers are the reports',
YAML front matter, re-runs that do nothing, a failed step that leaves the tree as it was."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mixq.quantize.release.card import read_front_matter
from tests.test_quantize_engine import tiny_hf

ROOT = Path(__file__).resolve().parent.parent


def make(out: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(make_args(out, model, *extra), capture_output=True, text=True, timeout=1200)


def make_args(out: Path, model: Path, *extra: str) -> list[str]:
    return ["make", "-C", str(ROOT), "--no-print-directory", "release", f"MODEL={model}", f"OUT={out}",
            f"MIXQ={sys.executable} -m mixq", "INSTALL=", "GROUP=128", "SAMPLES=4", "SEQLEN=32", "EVAL_SEQLEN=64",
            "EVAL_TOKENS=256", "MAX_NEW=4", "OUTTYPES=f16 q8_0", "NAME=tiny-mixtral", f"BASE_MODEL={BASE}",
            "QUANTIZED_BY=mixq tests", "HUB_ORG=me", *extra]


BASE = "test-org/tiny-mixtral"


def tree(path: Path) -> dict:
    """Every file of a release and its modification time, the settings stamps (.mixq/) aside."""
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))
            if p.is_file() and p.relative_to(path).parts[0] != ".mixq"}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("release")
    model = tiny_hf(tmp)
    (model / "README.md").write_text("---\nlicense: mit\nlanguage:\n- en\n- fr\n---\n# tiny\n")
    result = make(tmp / "out", model)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp / "out", model, result


def test_tree(release):
    out, _, result = release
    files = set(tree(out))
    for repo in ("awq", "gptq"):
        assert {f"{repo}/{n}" for n in ("README.md", "check.json", "report.json", "config.json",
                                        "model.safetensors", "tokenizer.json")} <= files
    assert {"gguf/tiny-mixtral-f16.gguf", "gguf/tiny-mixtral-q8_0.gguf", "gguf/tiny-mixtral-f16.check.json",
            "gguf/tiny-mixtral-q8_0.check.json", "gguf/README.md"} <= files
    assert not [f for f in files if ".partial" in f or "mixq-partial" in f]
    assert "perplexity" in result.stdout and "awq" in result.stdout  # the summary table


def test_cards_state_the_reports_numbers(release):
    out, _, _ = release
    for repo, method in (("awq", "awq"), ("gptq", "gptq")):
        card = (out / repo / "README.md").read_text()
        check = json.loads((out / repo / "check.json").read_text())
        report = json.loads((out / repo / "report.json").read_text())
        assert f"| this repository | {check['perplexity']:.4f} |" in card
        assert f"{check['reference_perplexity']:.4f}" in card and f"{check['kl']:.5f}" in card
        assert f"({check['delta_percent']:+.2f}%)" in card
        assert f"--quantize {method}" in card and "vllm serve REPO --dtype half\n" in card and "[INST]" in card
        assert f"| {report['calibration']['source']} | {report['calibration']['tokens']} |" in card
        for generation in check["generations"]:
            assert generation["text"].strip() in card
    gguf_card = (out / "gguf/README.md").read_text()
    for t in ("f16", "q8_0"):
        check = json.loads((out / f"gguf/tiny-mixtral-{t}.check.json").read_text())
        assert re.search(rf"tiny-mixtral-{t}\.gguf \|[^\n]*\| {check['perplexity']:.4f} \|", gguf_card)


def test_front_matter_parses(release):
    """As the Hub reads it (huggingface_hub's ModelCard): the original by its Hub id, the relation, the library and
    pipeline; the source's own card gives license and languages (the tiny model's README says mit, en and fr)."""
    from huggingface_hub import ModelCard
    out, _, _ = release
    for card, library in (("awq", "transformers"), ("gptq", "transformers"), ("gguf", "gguf")):
        fields = ModelCard.load(out / card / "README.md").data.to_dict()
        assert fields == read_front_matter(out / card / "README.md")
        assert fields["base_model"] == BASE and fields["base_model_relation"] == "quantized"
        assert fields["library_name"] == library and fields["pipeline_tag"] == "text-generation"
        assert fields["quantized_by"] == "mixq tests" and fields["inference"] is False
        assert fields["license"] == "mit" and fields["language"] == ["en", "fr"]
        assert fields["prompt_template"] == "<s>[INST] {prompt} [/INST]" and fields["model_type"] == "mixtral"
        assert "mixq" in fields["tags"]
    text = (out / "awq/README.md").read_text()
    assert yaml.safe_load(text.split("---\n")[1]) == read_front_matter(out / "awq/README.md")


def test_cards_link_the_release_and_carry_the_original_card(release):
    out, _, _ = release
    for card, others in (("awq", ("GPTQ", "GGUF")), ("gptq", ("AWQ", "GGUF")), ("gguf", ("AWQ", "GPTQ"))):
        text = (out / card / "README.md").read_text()
        links = [f"- [me/tiny-mixtral-{o}](https://huggingface.co/me/tiny-mixtral-{o})" for o in others]
        assert "## Other formats\n\n" + "\n".join(links) + "\n" in text
        assert f"me/tiny-mixtral-{card.upper()})" not in text
        assert text.rstrip().endswith("## Original model card\n\n## tiny")  # its heading one level down


def test_make_publish_dry_run_lists_each_checked_artifact(release):
    out, model, _ = release
    result = make(out, model, "publish", "HUB_ORG=me", "DRY_RUN=1")
    assert result.returncode == 0, result.stderr[-2000:]
    for suffix in ("AWQ", "GPTQ", "GGUF"):
        assert f"me/tiny-mixtral-{suffix} (main)" in result.stdout
    assert "dry run: nothing uploaded" in result.stdout and ".mixq" not in result.stdout
    refused = make(out, model, "publish", "HUB_ORG=")
    assert refused.returncode != 0 and "make publish needs HUB_ORG=ORG" in refused.stderr
    assert "mixq" not in refused.stdout


def test_upload_sends_exactly_the_checked_files(release, cli, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub
    out, _, _ = release
    listed = cli("upload", out / "awq", "--repo-id", "me/tiny-AWQ", "--dry-run", "--json")
    assert listed.exit_code == 0, listed.output
    files = json.loads(listed.stdout)["files"]
    assert {"README.md", "check.json", "config.json", "model.safetensors", "report.json"} <= set(files)
    calls = []

    class Api:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id))

        def create_branch(self, repo_id, branch, **kw):
            calls.append(("create_branch", branch))

        def upload_folder(self, repo_id, folder_path, revision, allow_patterns, **kw):
            calls.append(("upload_folder", repo_id, revision, allow_patterns))
            return type("Commit", (), {"commit_url": "https://huggingface.co/me/tiny-AWQ/commit/1"})()
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    sent = cli("upload", out / "awq", "--repo-id", "me/tiny-AWQ", "--revision", "g128", "--json")
    assert sent.exit_code == 0, sent.output
    assert calls == [("create_repo", "me/tiny-AWQ"), ("create_branch", "g128"),
                     ("upload_folder", "me/tiny-AWQ", "g128", files)]
    # unchecked, or checked before the weights were remade: refused in one line, nothing sent
    copy = tmp_path / "awq"
    shutil.copytree(out / "awq", copy)
    (copy / "check.json").unlink()
    for case, says in (("missing", "check.json: missing"), ("stale", "check.json: older than model.safetensors")):
        if case == "stale":
            shutil.copy(out / "awq/check.json", copy / "check.json")
            os.utime(copy / "model.safetensors", ns=(time.time_ns() + 10**9,) * 2)
        refused = cli("upload", copy, "--repo-id", "me/tiny-AWQ")
        assert refused.exit_code == 1 and says in refused.stderr and refused.stderr.count("\n") == 1, refused.stderr
    assert len(calls) == 3


def test_no_local_path_in_the_release(release):
    """Every file of a release may be published: none names the folders it was made in."""
    out, model, _ = release
    for path in out.rglob("*"):
        if path.is_file() and ".mixq" not in path.parts:
            data = path.read_bytes()
            assert str(out.parent).encode() not in data and str(model).encode() not in data, path


def test_second_release_does_nothing(release):
    out, model, _ = release
    before = tree(out)
    again = make(out, model)
    assert again.returncode == 0, again.stderr[-2000:]
    assert tree(out) == before
    assert "mixq quantize" not in again.stdout and "mixq convert" not in again.stdout


def test_failed_step_leaves_the_tree_as_it_was(release):
    out, model, _ = release
    before = tree(out)
    failed = make(out, model, "OUTTYPES=f16 q8_0 q4_0", "CHECK_FLAGS=--fail-above -1000")
    assert failed.returncode != 0
    after = tree(out)
    new = set(after) - set(before)
    assert new <= {"gguf/tiny-mixtral-q4_0.gguf"}  # the finished conversion stays; its failed check leaves nothing
    assert {k: v for k, v in after.items() if k in before} == before
    assert not [f for f in after if "partial" in f]


def test_changed_settings_remake_exactly_what_they_affect(release):
    """Another GROUP remakes the AWQ and GPTQ repositories, their checks and cards, and no GGUF file."""
    out, model, _ = release
    assert make(out, model).returncode == 0   # back to the fixture's settings after the failed run above
    before = tree(out)
    again = make(out, model, "GROUP=64")
    assert again.returncode == 0, again.stderr[-2000:]
    after = tree(out)
    changed = {f for f in after if before.get(f) != after[f]}
    assert {f.split("/")[0] for f in changed} == {"awq", "gptq"}, changed
    assert {"awq/config.json", "awq/check.json", "awq/README.md", "gptq/README.md"} <= changed
    for repo in ("awq", "gptq"):
        assert json.loads((out / repo / "report.json").read_text())["settings"]["scheme"]["group_size"] == 64
    assert make(out, model, "GROUP=64").returncode == 0 and tree(out) == after


def test_an_importance_matrix_remakes_the_k_quants_and_nothing_else(release):
    """IMATRIX=auto after a run without one remakes the K-quant (with the matrix), its check and the GGUF card."""
    pytest.importorskip("llama_cpp", reason="needs the llama-cpp extra (llama-cpp-python)")
    from mixq.convert import inspect_checkpoint
    out, model, _ = release
    with_k = ("GROUP=64", "OUTTYPES=f16 q8_0 q4_k_m")   # GROUP as the test above left the release
    first = make(out, model, *with_k)
    assert first.returncode == 0, first.stderr[-2000:]
    before = tree(out)
    again = make(out, model, *with_k, "IMATRIX=auto")
    assert again.returncode == 0, again.stderr[-2000:]
    after = tree(out)
    assert {f for f in after if before.get(f) != after[f]} == {
        "gguf/tiny-mixtral-q4_k_m.gguf", "gguf/tiny-mixtral-q4_k_m.check.json", "gguf/README.md"}
    meta = inspect_checkpoint(out / "gguf/tiny-mixtral-q4_k_m.gguf")["metadata"]
    assert meta["quantize.imatrix.file"] == "auto (kjv, 4 x 32 tokens)" and meta["quantize.imatrix.dataset"] == "kjv"
    card = (out / "gguf/README.md").read_text()
    assert "| auto (kjv, 4 x 32 tokens) |" in card and "imatrix" in read_front_matter(out / "gguf/README.md")["tags"]
    assert make(out, model, *with_k, "IMATRIX=auto").returncode == 0 and tree(out) == after


@pytest.mark.parametrize("case", ["evaluation text missing", "k-quant without llama.cpp", "bits awq cannot hold",
                                  "i-quant without importance matrix"])
def test_a_pipeline_fails_before_its_first_step(release, tmp_path, case):
    """What a release needs is checked before the first quantization, not after hours of it."""
    _, model, _ = release
    extra, says, env = {
        "evaluation text missing": (["EVAL=/nonexistent/eval.txt"], "/nonexistent/eval.txt: no such file", {}),
        "k-quant without llama.cpp": (["OUTTYPES=f16 q4_k_m"], "GGUF q4_k_m need llama.cpp's quantizer",
                                      {"PYTHONPATH": str(tmp_path / "hide")}),
        "bits awq cannot hold": (["BITS=8"], "--bits 8: the AWQ format holds 4-bit weights", {}),
        "i-quant without importance matrix": (["OUTTYPES=f16 iq2_xs"], "GGUF iq2_xs need an importance matrix", {}),
    }[case]
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "llama_cpp.py").write_text("raise ImportError('hidden by the test')\n")
    result = subprocess.run(make_args(tmp_path / "out", model, *extra), capture_output=True, text=True,
                            timeout=600, env=os.environ | env)
    assert result.returncode != 0 and f"mixq: error: {says}" in result.stderr, result.stderr[-2000:]
    assert "mixq quantize" not in result.stdout and not (tmp_path / "out").exists()


def test_cards_name_no_local_path(cli, tmp_path):
    """Without --base-model the card names the source folder, writes no base_model and no path; flags override
    the source's own card; a --base-model that is not a Hub id is refused in one line."""
    from huggingface_hub import ModelCard

    from mixq.quantize import Scheme, Settings, quantize_model
    model = tiny_hf(tmp_path / "src")
    (model / "README.md").write_text("---\nlicense: mit\nlanguage: [en, fr]\n---\n")
    quantize_model(model, tmp_path / "q", Settings(method="rtn", scheme=Scheme(4, 128, sym=True), fmt="gptq"))
    assert cli("card", tmp_path / "q").exit_code == 0
    text = (tmp_path / "q/README.md").read_text()
    fields = ModelCard.load(tmp_path / "q/README.md").data.to_dict()
    assert "base_model" not in fields and "base_model_relation" not in fields and fields["license"] == "mit"
    assert str(tmp_path) not in text and "quantization of `hf`" in text
    result = cli("card", tmp_path / "q", "--license", "apache-2.0", "--language", "de", "--base-model", "org/m")
    assert result.exit_code == 0, result.output
    fields = ModelCard.load(tmp_path / "q/README.md").data.to_dict()
    assert (fields["license"], fields["language"], fields["base_model"]) == ("apache-2.0", ["de"], "org/m")
    refused = cli("card", tmp_path / "q", "--base-model", str(model))
    assert refused.exit_code == 1 and "not a Hub id (ORG/NAME)" in refused.stderr
    assert refused.stderr.count("\n") == 1


def test_calibration_datasets_by_hub_id():
    from mixq.quantize.release.metadata import calibration_dataset
    assert calibration_dataset("pileval") == "mit-han-lab/pile-val-backup"
    assert calibration_dataset("hf:org/texts") == "org/texts" and calibration_dataset("org/texts:cfg") == "org/texts"
    assert calibration_dataset("kjv") is None and calibration_dataset("data.jsonl") is None


def test_published_reports_name_no_local_path(tmp_path):
    from mixq.convert.provenance import published
    local = tmp_path / "models" / "mine"
    local.mkdir(parents=True)
    report = {"model": str(local), "calibration": {"source": "hf:org/texts", "tokenizer_name": str(local)},
              "check": {"reference": "org/base", "eval": {"source": "kjv"}}, "layers": [{"source": "/abs/x.txt"}]}
    assert published(report) == {"model": "mine", "calibration": {"source": "hf:org/texts", "tokenizer_name": "mine"},
                                 "check": {"reference": "org/base", "eval": {"source": "kjv"}},
                                 "layers": [{"source": "x.txt"}]}
