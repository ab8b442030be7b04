"""`mixq upload`: a checked repository (or folder of GGUF files) to the Hub, exactly the files `--dry-run` lists.
Nothing goes up unchecked: every model file needs a check report at least as new as it (an AWQ or GPTQ
repository its check.json, each GGUF file its NAME.check.json), and a check that failed its gate writes none. The
settings stamps of a pipeline (.mixq/) and every other hidden file stay home."""

from __future__ import annotations

from pathlib import Path

from mixq.convert.errors import MixqError
from mixq.convert.provenance import hub_id

from ..check import CHECK_FILE, read_check


def _checks(folder: Path) -> list[tuple[list[Path], Path]]:
    """(model files, the check report that must vouch for them) for a repository or a folder of GGUF files."""
    ggufs = sorted(folder.glob("*.gguf"))
    if ggufs:
        return [([f], f.with_suffix(".check.json")) for f in ggufs]
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise MixqError(f"{folder}: neither a quantized repository (no *.safetensors) nor a folder of .gguf files")
    return [(weights, folder / CHECK_FILE)]


def upload_plan(folder: str | Path) -> list[str]:
    """The files an upload of `folder` sends (relative paths), after refusing a folder any of whose model files
    has no passing check report newer than it, or no model card."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MixqError(f"{folder}: not a folder")
    for files, check in _checks(folder):
        if read_check(check) is None:
            raise MixqError(f"{check}: missing, so {files[0].name} is unchecked (a failed check writes none): run "
                            f"mixq check {folder if check.name == CHECK_FILE else files[0]} --reference BASE -o "
                            f"{check}")
        stale = [f.name for f in files if f.stat().st_mtime > check.stat().st_mtime]
        if stale:
            raise MixqError(f"{check}: older than {stale[0]}, which was remade after it: check it again")
    if not (folder / "README.md").is_file():
        raise MixqError(f"{folder}: no model card (README.md): run mixq card {folder}")
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def upload(folder: str | Path, repo_id: str, revision: str | None = None, dry_run: bool = False,
           private: bool = False) -> dict:
    """Send `upload_plan(folder)` to the model repository `repo_id` (created if needed; `revision`: a branch,
    created from main if needed). `dry_run`: only say what would go."""
    if not hub_id(repo_id):
        raise MixqError(f"--repo-id {repo_id}: not a Hub id (ORG/NAME)")
    folder = Path(folder)
    files = upload_plan(folder)
    result = {"repo_id": repo_id, "revision": revision or "main", "files": files,
              "bytes": sum((folder / f).stat().st_size for f in files), "dry_run": dry_run}
    if dry_run:
        return result
    from huggingface_hub import HfApi
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                                   allow_patterns=files, commit_message=f"Upload {folder.name} with mixq")
    except Exception as e:  # no network, no token, no rights: one line, nothing changed there
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise MixqError(f"{repo_id}: upload failed ({type(e).__name__}: {reason})") from None
    result["commit"] = getattr(commit, "commit_url", str(commit))
    return result
