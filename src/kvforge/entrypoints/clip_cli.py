"""``kvforge clip``: zero-shot classification, image index and search, linear probe, training."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _classes(args: argparse.Namespace) -> list[str]:
    names = [c.strip() for c in (args.classes or "").split(",") if c.strip()]
    if args.classes_file:
        names += [line.strip() for line in Path(args.classes_file).read_text().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ValueError("give class names with --classes a,b,c or --classes-file")
    return names


def cmd_zero_shot(args: argparse.Namespace) -> int:
    from kvforge.clip import load
    from kvforge.clip.tasks import TEMPLATES, zero_shot

    clip, _ = load(args.model)
    names = _classes(args)
    probabilities = zero_shot(clip, args.images, names, args.template or TEMPLATES)
    for image, row in zip(args.images, probabilities):
        best = row.topk(min(args.top, len(names)))
        ranked = ", ".join(
            f"{names[i]} {p:.3f}" for p, i in zip(best.values.tolist(), best.indices.tolist())
        )
        print(f"{image}: {ranked}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from kvforge.clip import load
    from kvforge.clip.tasks import build_index

    clip, _ = load(args.model)
    count = build_index(clip, args.folder, args.out)
    print(f"indexed {count} images into {args.out}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from kvforge.clip import load
    from kvforge.clip.tasks import load_index, search

    clip, _ = load(args.model)
    for path, score in search(clip, load_index(args.index), args.query, args.k, args.image):
        print(f"{score:.4f}  {path}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    """Linear probe on labelled folders (one sub-folder per class)."""
    import torch

    from kvforge.clip import load
    from kvforge.clip.tasks import image_files, linear_probe

    clip, _ = load(args.model)

    def labelled(root: str, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        paths, labels = [], []
        for index, name in enumerate(classes):
            for path in image_files(Path(root) / name):
                paths.append(path)
                labels.append(index)
        if not paths:
            raise ValueError(f"{root}: no images in class sub-folders")
        return clip.encode_image(paths), torch.tensor(labels)

    classes = sorted(p.name for p in Path(args.train).iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{args.train}: needs at least two class sub-folders")
    features, labels = labelled(args.train, classes)
    probe = linear_probe(features, labels, args.weight_decay)
    test_features, test_labels = labelled(args.test, classes)
    with torch.no_grad():
        accuracy = (probe(test_features).argmax(1) == test_labels).float().mean().item()
    print(
        f"linear probe: {len(classes)} classes, {len(labels)} training images, "
        f"test accuracy {accuracy:.1%} on {len(test_labels)}"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from kvforge.clip.train import TrainOptions, train

    options = TrainOptions(
        image_size=args.image_size,
        patch_size=args.patch_size,
        width=args.width,
        layers=args.layers,
        heads=args.heads,
        projection_dim=args.projection_dim,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        bf16=args.bf16,
    )
    result = train(args.data, args.out, options)
    print(
        f"trained {args.steps} steps in {result['seconds']:.0f} s, final loss "
        f"{result['loss']:.3f}; model in {args.out}"
    )
    return 0


def cmd_train_projector(args: argparse.Namespace) -> int:
    from kvforge.tools.vision_train import ProjectorOptions, train_projector

    options = ProjectorOptions(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        feature_layer=args.feature_layer,
        image_token_id=args.image_token_id,
        seed=args.seed,
    )
    result = train_projector(args.model, args.clip, args.data, args.out, options)
    print(
        f"projector trained in {result['seconds']:.0f} s, final loss {result['loss']:.3f}; "
        f"serve it with: kvforge serve --mmproj {args.out}"
    )
    return 0


def add_clip_parser(sub: Any) -> None:
    clip = sub.add_parser("clip", help="CLIP: zero-shot, index, search, probe, train")
    tools = clip.add_subparsers(dest="clip_command", required=True)

    zs = tools.add_parser("zero-shot", help="classify images by class names")
    zs.add_argument("model", help="CLIP checkpoint directory (Hugging Face or OpenCLIP)")
    zs.add_argument("images", nargs="+")
    zs.add_argument("--classes", help="comma-separated class names")
    zs.add_argument("--classes-file", help="one class name per line")
    zs.add_argument("--template", action="append", help="prompt with {} (repeat; default: 4)")
    zs.add_argument("--top", type=int, default=3)
    zs.set_defaults(func=_guarded(cmd_zero_shot))

    index = tools.add_parser("index", help="embed a folder of images into an index file")
    index.add_argument("model")
    index.add_argument("folder")
    index.add_argument("--out", required=True, help="index file (safetensors)")
    index.set_defaults(func=_guarded(cmd_index))

    search = tools.add_parser("search", help="the indexed images closest to a text or image")
    search.add_argument("model")
    search.add_argument("index")
    search.add_argument("query", help="text (or an image path with --image)")
    search.add_argument("-k", type=int, default=5)
    search.add_argument("--image", action="store_true", help="the query is an image file")
    search.set_defaults(func=_guarded(cmd_search))

    probe = tools.add_parser("probe", help="linear probe on frozen image features")
    probe.add_argument("model")
    probe.add_argument("--train", required=True, help="folder with one sub-folder per class")
    probe.add_argument("--test", required=True, help="the same layout, held-out images")
    probe.add_argument("--weight-decay", type=float, default=1e-3)
    probe.set_defaults(func=_guarded(cmd_probe))

    tr = tools.add_parser("train", help="contrastive training from image-caption pairs")
    tr.add_argument("data", help="folder with captions.jsonl ({image, caption[, group]})")
    tr.add_argument("out", help="output checkpoint directory")
    tr.add_argument("--steps", type=int, default=3000)
    tr.add_argument("--batch-size", type=int, default=128)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--image-size", type=int, default=32)
    tr.add_argument("--patch-size", type=int, default=8)
    tr.add_argument("--width", type=int, default=64)
    tr.add_argument("--layers", type=int, default=4)
    tr.add_argument("--heads", type=int, default=4)
    tr.add_argument("--projection-dim", type=int, default=64)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--checkpoint-every", type=int, default=0)
    tr.add_argument("--bf16", action="store_true", help="bfloat16 autocast (AVX-512 BF16 CPUs)")
    tr.set_defaults(func=_guarded(cmd_train))

    tp = tools.add_parser(
        "train-projector",
        help="train a LLaVA projector from a CLIP tower into a language model (mmproj GGUF)",
    )
    tp.add_argument("--clip", required=True, help="CLIP checkpoint directory (its vision tower)")
    tp.add_argument("--data", required=True, help="folder with conversations.jsonl")
    tp.add_argument("--out", required=True, help="mmproj GGUF file to write")
    tp.add_argument("-m", "--model", default=None, help="the language model (default: embedded)")
    tp.add_argument("--steps", type=int, default=300)
    tp.add_argument("--batch-size", type=int, default=8)
    tp.add_argument("--lr", type=float, default=2e-3)
    tp.add_argument("--feature-layer", type=int, default=-1, help="tower layer to project")
    tp.add_argument(
        "--image-token-id", type=int, default=16, help="placeholder token (SmolLM2: 16)"
    )
    tp.add_argument("--seed", type=int, default=0)
    tp.set_defaults(func=_guarded(cmd_train_projector))


def _guarded(command: Any) -> Any:
    """Bad input (missing files, malformed data) as a one-line error and exit status 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(command(args))
        except (ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run
