"""A model named by its Hub id: fetched once into the cache, only the files mixq reads; offline or unknown, one
line says how to pass a local folder. The Hub is stood in for by a local repository (no network here)."""

import fnmatch
import shutil

import huggingface_hub

from tests.test_quantize_engine import tiny_hf


def test_a_hub_id_is_fetched_into_the_cache_with_only_what_mixq_reads(cli, tmp_path, monkeypatch):
    repo = tiny_hf(tmp_path / "hub")
    (repo / "pytorch_model.bin").write_bytes(b"a duplicate mixq never reads")
    (repo / "README.md").write_text("---\nlicense: mit\n---\n")
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_dir=None, **kwargs):
        calls.append((repo_id, revision))
        for file in repo.iterdir():
            if any(fnmatch.fnmatch(file.name, p) for p in allow_patterns):
                local_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, local_dir / file.name)
        return str(local_dir)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("MIXQ_CACHE", str(tmp_path / "cache"))
    result = cli("check", "org/tiny@v1", "--seqlen", 64, "--max-tokens", 128, "--max-new-tokens", 0, "--json")
    assert result.exit_code == 0, result.output
    assert calls == [("org/tiny", "v1")]
    cached = tmp_path / "cache/hub/org/tiny@v1"
    assert (cached / "model.safetensors").exists() and (cached / "README.md").exists()
    assert not (cached / "pytorch_model.bin").exists()


def test_an_unreachable_hub_id_says_how_to_pass_a_folder(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXQ_CACHE", str(tmp_path / "cache"))   # HF_HUB_OFFLINE=1 (conftest): nothing to fetch
    result = cli("quantize", "gptq", "nobody/nothing", tmp_path / "out")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("mixq: error: nobody/nothing: no such local folder")
    assert "hf download nobody/nothing --local-dir DIR) and pass DIR" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache/hub/nobody").exists()
