"""Models by name: ``Org/Name`` (a Hugging Face directory) or ``Org/Name:Q4_K_M`` (a GGUF
file of a GGUF repository) found in the local Hugging Face cache, never downloaded.

``huggingface_hub`` reads the cache (``HF_HOME`` / ``HF_HUB_CACHE``) in offline mode; a name
that is not there is a one-line :class:`ModelNotFoundError` that says how to fetch it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from kvforge.errors import ModelNotFoundError

_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<quant>[\w.-]+))?$")


def cache_dir() -> str | None:
    """The cache the environment names now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None  # the library's default


def is_model_name(spec: str) -> bool:
    """``spec`` looks like ``Org/Name`` or ``Org/Name:QUANT`` and is not an existing path."""
    return not Path(spec).exists() and _NAME.match(spec) is not None


def resolve(spec: str) -> str:
    """The local path of a model name (a path is returned as it is)."""
    match = _NAME.match(spec)
    if Path(spec).exists() or match is None:
        return spec
    repo, quant = match["repo"], match["quant"]
    fetch = f"fetch it with: huggingface-cli download {repo}"
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - a dependency
        raise ModelNotFoundError(f"{spec}: huggingface_hub is not installed") from exc
    try:
        folder = Path(snapshot_download(repo, local_files_only=True, cache_dir=cache_dir()))
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{repo} is not in the local Hugging Face cache; {fetch}") from exc
    ggufs = sorted(folder.rglob("*.gguf"))
    if quant is not None:
        chosen = [p for p in ggufs if quant.lower() in p.name.lower()]
        if not chosen:
            have = ", ".join(p.name for p in ggufs) or "no GGUF files"
            raise ModelNotFoundError(f"{repo} has no {quant} file in the cache ({have}); {fetch}")
        return str(chosen[0])
    if (folder / "config.json").exists():
        return str(folder)
    if len(ggufs) == 1:
        return str(ggufs[0])
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ModelNotFoundError(
            f"{repo} holds several GGUF files ({names}): name one as {repo}:QUANT"
        )
    raise ModelNotFoundError(
        f"{repo} in the cache has neither config.json nor a GGUF file; {fetch}"
    )


def cached_models() -> list[dict[str, Any]]:
    """The models in the local Hugging Face cache: name, kind and size in bytes."""
    try:
        from huggingface_hub import scan_cache_dir
    except ImportError:  # pragma: no cover
        return []
    try:
        info = scan_cache_dir(cache_dir())
    except Exception:  # noqa: BLE001 - no cache yet, or one that cannot be read
        return []
    models = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        files = {f.file_name for revision in repo.revisions for f in revision.files}
        ggufs = sorted(name for name in files if name.endswith(".gguf"))
        kind = "hf" if "config.json" in files else "gguf" if ggufs else "other"
        models.append(
            {"name": repo.repo_id, "kind": kind, "bytes": repo.size_on_disk, "gguf": ggufs}
        )
    return models
