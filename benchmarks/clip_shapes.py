"""Generated shapes for CLIP: write image-caption folders, train, measure zero-shot and
retrieval on held-out combinations.

    python benchmarks/clip_shapes.py [--steps 3000] [--out /tmp/clip-shapes]

Images are 32x32: a shape (circle, square, triangle, cross, diamond) of a colour (red, green,
blue, yellow, purple, white), big or small, on the left / right / top / bottom / centre of a
noisy dark background. A fifth of the (shape, colour, position) combinations never appear in
training; the held-out set has only those. Prints the training time, zero-shot accuracy over
the 30 colour-shape classes (prompt ensemble) and text-to-image recall@1 (each held-out
combination's caption against one image of each held-out combination), and the CPU model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 220, 50),
    "purple": (150, 60, 200),
    "white": (235, 235, 235),
}
POSITIONS = {
    "left": (8, 16),
    "right": (24, 16),
    "top": (16, 8),
    "bottom": (16, 24),
    "centre": (16, 16),
}
SIZES = {"small": 4.0, "big": 6.5}
SIZE = 32


def draw(shape: str, colour: str, position: str, size: str, rng: random.Random) -> np.ndarray:
    """One 32x32 RGB image."""
    noise = np.random.default_rng(rng.randrange(1 << 30))
    image = noise.integers(20, 60, (SIZE, SIZE, 3)).astype(np.float32)
    cx, cy = POSITIONS[position]
    cx, cy = cx + rng.uniform(-1.5, 1.5), cy + rng.uniform(-1.5, 1.5)
    r = SIZES[size] * rng.uniform(0.9, 1.1)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif shape == "square":
        inside = (abs(dx) <= r * 0.85) & (abs(dy) <= r * 0.85)
    elif shape == "triangle":
        inside = (dy <= r * 0.8) & (dy >= -r) & (abs(dx) <= (dy + r) * 0.6)
    elif shape == "cross":
        inside = ((abs(dx) <= r / 3) & (abs(dy) <= r)) | ((abs(dy) <= r / 3) & (abs(dx) <= r))
    else:  # diamond
        inside = abs(dx) + abs(dy) <= r
    tint = np.array(COLOURS[colour], np.float32) * rng.uniform(0.85, 1.0)
    image[inside] = tint
    return image.clip(0, 255).astype(np.uint8)


def combinations() -> list[tuple[str, str, str]]:
    return list(itertools.product(SHAPES, COLOURS, POSITIONS))


def split(seed: int = 0) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(training, held-out) combinations: a fifth held out, every colour-shape pair still seen
    in training at some position."""
    rng = random.Random(seed)
    held: list[tuple[str, str, str]] = []
    for shape, colour in itertools.product(SHAPES, COLOURS):
        held.append((shape, colour, rng.choice(list(POSITIONS))))
    train = [c for c in combinations() if c not in held]
    return train, held


def caption(shape: str, colour: str, position: str, size: str, rng: random.Random) -> str:
    """A caption in one of a few phrasings; some leave out the size or the position."""
    words = f"{colour} {shape}"
    if rng.random() < 0.5:
        words = f"{size} {words}"
    where = {"centre": "in the centre"}.get(position, f"on the {position}")
    lead = rng.choice(["a", "a photo of a", "a picture of a", "an image of a"])
    return f"{lead} {words} {where}." if rng.random() < 0.75 else f"{lead} {words}."


def write(folder: Path, combos: list[tuple[str, str, str]], per_combo: int, seed: int) -> None:
    """``per_combo`` images of each combination, with captions.jsonl."""
    from PIL import Image

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for shape, colour, position in combos:
        for copy in range(per_combo):
            size = rng.choice(list(SIZES))
            name = f"{shape}-{colour}-{position}-{copy}.png"
            Image.fromarray(draw(shape, colour, position, size, rng)).save(folder / name)
            text = caption(shape, colour, position, size, rng)
            group = f"{shape}/{colour}/{position}/{size}"
            lines.append(json.dumps({"image": name, "caption": text, "group": group}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")


def evaluate(model_dir: Path, held_dir: Path) -> dict[str, float]:
    """Zero-shot accuracy over colour-shape classes and text-to-image recall@1 on held-out."""
    import torch

    from kvforge.clip import load
    from kvforge.clip.tasks import zero_shot

    clip, _ = load(model_dir)
    entries = [json.loads(line) for line in (held_dir / "captions.jsonl").read_text().splitlines()]
    images = [held_dir / e["image"] for e in entries]
    truth = [tuple(e["group"].split("/")[:2]) for e in entries]  # (shape, colour)
    classes = list(itertools.product(SHAPES, COLOURS))
    names = [f"{colour} {shape}" for shape, colour in classes]
    probabilities = zero_shot(clip, images, names)
    predicted = probabilities.argmax(dim=1).tolist()
    accuracy = sum(classes[p] == t for p, t in zip(predicted, truth)) / len(truth)
    # retrieval: one image per held-out combination, its full caption as the query
    firsts = {}
    for entry in entries:
        firsts.setdefault("/".join(entry["group"].split("/")[:3]), entry)
    chosen = list(firsts.values())
    queries = []
    for entry in chosen:
        shape, colour, position = entry["group"].split("/")[:3]
        where = {"centre": "in the centre"}.get(position, f"on the {position}")
        queries.append(f"a {colour} {shape} {where}.")
    image_vectors = clip.encode_image([held_dir / e["image"] for e in chosen])
    text_vectors = clip.encode_text(queries)
    hits = (text_vectors @ image_vectors.t()).argmax(dim=1) == torch.arange(len(chosen))
    return {"zero_shot": accuracy, "recall_at_1": hits.float().mean().item()}


def main() -> None:
    from kvforge.entrypoints.bench.report import cpu_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("clip-shapes"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--per-combo", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--skip-data", action="store_true", help="reuse the folders in --out")
    args = parser.parse_args()
    from kvforge.clip.train import TrainOptions, train

    train_combos, held_combos = split(args.seed)
    if not args.skip_data:
        write(args.out / "train", train_combos, args.per_combo, args.seed)
        write(args.out / "heldout", held_combos, 8, args.seed + 1)
    options = TrainOptions(steps=args.steps, patch_size=args.patch_size)
    result = train(args.out / "train", args.out / "model", options)
    scores = evaluate(args.out / "model", args.out / "heldout")
    print(f"CPU: {cpu_model()}", file=sys.stderr)
    print(
        f"training: {args.steps} steps in {result['seconds']:.0f} s, final loss {result['loss']:.3f}"
    )
    print(f"zero-shot accuracy on held-out combinations: {scores['zero_shot']:.1%}")
    print(f"text-to-image recall@1 on held-out combinations: {scores['recall_at_1']:.1%}")


if __name__ == "__main__":
    main()
