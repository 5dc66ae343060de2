"""What CLIP embeddings are for: zero-shot classification with prompt ensembles, retrieval over
a saved index, and a linear probe on frozen image features."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from kvforge.clip.model import Clip
from kvforge.errors import ModelFileError

# the CLIP paper's habit: several phrasings of each class name, averaged
TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def class_embeddings(
    clip: Clip, classnames: Sequence[str], templates: Sequence[str] = TEMPLATES
) -> torch.Tensor:
    """[classes, dim]: per class, the unit embeddings of every template filled with its name,
    averaged and renormalised."""
    if not classnames or not templates:
        raise ValueError("zero-shot needs at least one class name and one template")
    if any("{}" not in t for t in templates):
        raise ValueError("every template needs a {} for the class name")
    texts = [t.format(name) for name in classnames for t in templates]
    vectors = clip.encode_text(texts).view(len(classnames), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(vectors, dim=-1)


def zero_shot(
    clip: Clip,
    images: Sequence[object] | torch.Tensor,
    classnames: Sequence[str],
    templates: Sequence[str] = TEMPLATES,
) -> torch.Tensor:
    """[images, classes] probabilities (softmax of the scaled cosine similarities)."""
    classes = class_embeddings(clip, classnames, templates)
    scale = clip.model.logit_scale.detach().exp()
    return (scale * clip.encode_image(images) @ classes.t()).softmax(dim=-1)


def image_files(folder: str | Path) -> list[Path]:
    """The image files under ``folder`` (recursively), sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def build_index(clip: Clip, folder: str | Path, out: str | Path, batch_size: int = 64) -> int:
    """Embed every image under ``folder`` into ``out`` (safetensors: the unit embeddings, the
    paths in its metadata); returns how many. Unreadable images are skipped with a warning."""
    from safetensors.torch import save_file

    from kvforge.clip.image import ImageError

    paths: list[str] = []
    vectors: list[torch.Tensor] = []
    files = image_files(folder)
    for start in range(0, len(files), batch_size):
        chunk, pixels = [], []
        for path in files[start : start + batch_size]:
            try:
                pixels.append(clip.preprocess(path))
                chunk.append(path)
            except ImageError as exc:
                print(f"skipping {path}: {exc}")
        if pixels:
            vectors.append(clip.encode_image(torch.stack(pixels)))
            paths.extend(str(p) for p in chunk)
    dim = clip.config.projection_dim
    matrix = torch.cat(vectors) if vectors else torch.zeros(0, dim)
    save_file({"embeddings": matrix.contiguous()}, str(out), {"paths": json.dumps(paths)})
    return len(paths)


def load_index(path: str | Path) -> tuple[torch.Tensor, list[str]]:
    """(embeddings, paths) of an index written by :func:`build_index`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            paths = json.loads((handle.metadata() or {})["paths"])
            matrix = handle.get_tensor("embeddings")
    except (OSError, KeyError, ValueError) as exc:
        raise ModelFileError(path, f"not a CLIP index: {exc}") from exc
    if matrix.dim() != 2 or matrix.shape[0] != len(paths):
        raise ModelFileError(path, "the index's embeddings and paths disagree")
    return matrix, paths


def search(
    clip: Clip,
    index: tuple[torch.Tensor, list[str]],
    query: str | Path | bytes,
    k: int = 5,
    by_image: bool = False,
) -> list[tuple[str, float]]:
    """The ``k`` indexed images closest to a text (or, ``by_image``, to an image), with their
    cosine similarities, best first."""
    matrix, paths = index
    if matrix.shape[1] != clip.config.projection_dim:
        raise ValueError(
            f"the index holds {matrix.shape[1]}-dim embeddings, the model makes "
            f"{clip.config.projection_dim}"
        )
    if k < 1:
        raise ValueError("k must be at least 1")
    vector = clip.encode_image([query]) if by_image else clip.encode_text([str(query)])
    scores = (matrix @ vector[0]).tolist()
    best = sorted(range(len(paths)), key=lambda i: -scores[i])[:k]
    return [(paths[i], scores[i]) for i in best]


def linear_probe(
    features: torch.Tensor, labels: torch.Tensor, weight_decay: float = 1e-3, steps: int = 200
) -> torch.nn.Linear:
    """A logistic-regression classifier on frozen features (L-BFGS, L2 penalty), as the CLIP
    paper's linear-probe evaluation."""
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError("features must be [n, dim] and labels [n]")
    classes = int(labels.max()) + 1
    probe = torch.nn.Linear(features.shape[1], classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1, max_iter=steps, history_size=20)
    x = features.float()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x), labels)
        loss = loss + weight_decay * probe.weight.pow(2).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    return probe
