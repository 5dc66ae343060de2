"""The vision chat check: a CLIP tower trained here + a projector trained here, feeding the
embedded SmolLM2 model, asked "What colour is the shape?" over HTTP.

    python benchmarks/vision_chat.py [--out vision-chat] [--clip DIR] [--steps 200]

1. Generated shapes data and a CLIP model (benchmarks/clip_shapes.py; ``--clip`` reuses one
   trained on the same data, e.g. ``clip-shapes/model``).
2. conversations.jsonl for the training images ("What colour is the shape?" -> "The shape is
   red.", "What shape is it?" -> "It is a circle."), and the projector trained on them with
   the tower and the language model frozen (kvforge.tools.vision_train), written as an mmproj
   GGUF file.
3. ``kvforge serve --mmproj`` on the embedded model; every held-out image is sent as an
   ``image_url`` data URL with the question; a reply is right when it names the colour.
Prints the training times, the accuracy and the CPU model.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx


def _shapes():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "clip_shapes", Path(__file__).with_name("clip_shapes.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_conversations(folder: Path, seed: int = 0) -> int:
    """Questions about colour (70%) and shape (30%) for every image of a shapes folder."""
    rng = random.Random(seed)
    rows = []
    for line in (folder / "captions.jsonl").read_text().splitlines():
        entry = json.loads(line)
        shape, colour = entry["group"].split("/")[:2]
        if rng.random() < 0.7:
            question, answer = "What colour is the shape?", f"The shape is {colour}."
        else:
            question, answer = "What shape is it?", f"It is a {shape}."
        rows.append({"image": entry["image"], "question": question, "answer": answer})
    (folder / "conversations.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return len(rows)


def ask_over_http(mmproj: Path, held: Path, log: Path) -> tuple[int, int]:
    """(right, asked): the held-out images' colours asked of a server with the projector."""
    port = 18000 + random.randrange(1000)
    command = [sys.executable, "-m", "kvforge.entrypoints.cli", "serve", "--port", str(port)]
    command += ["--mmproj", str(mmproj), "--kv-cache-memory", "256MiB"]
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        right = asked = 0
        for line in (held / "captions.jsonl").read_text().splitlines():
            entry = json.loads(line)
            colour = entry["group"].split("/")[1]
            data = base64.b64encode((held / entry["image"]).read_bytes()).decode()
            content = [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                {"type": "text", "text": "What colour is the shape?"},
            ]
            body = {
                "messages": [{"role": "user", "content": content}],
                "max_tokens": 10,
                "temperature": 0,
            }
            reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
            text = reply["choices"][0]["message"]["content"].lower()
            right += colour in text
            asked += 1
        return right, asked
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    from kvforge.clip.train import TrainOptions, train
    from kvforge.entrypoints.bench.report import cpu_model
    from kvforge.tools.vision_train import ProjectorOptions, train_projector

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("vision-chat"))
    parser.add_argument("--clip", type=Path, default=None, help="a CLIP trained on the data")
    parser.add_argument(
        "--data", type=Path, default=None, help="the shapes folders (train/, heldout/)"
    )
    parser.add_argument("--steps", type=int, default=200, help="projector training steps")
    args = parser.parse_args()
    shapes = _shapes()
    data = args.data or args.out
    if args.data is None:
        train_combos, held_combos = shapes.split(0)
        shapes.write(data / "train", train_combos, 60, 0)
        shapes.write(data / "heldout", held_combos, 8, 1)
    clip_dir = args.clip
    clip_seconds = 0.0
    if clip_dir is None:
        clip_dir = args.out / "clip"
        clip_seconds = train(data / "train", clip_dir, TrainOptions())["seconds"]
    write_conversations(data / "train")
    mmproj = args.out / "mmproj.gguf"
    result = train_projector(
        None, clip_dir, data / "train", mmproj, ProjectorOptions(steps=args.steps)
    )
    right, asked = ask_over_http(mmproj, data / "heldout", args.out / "server.log")
    print(f"CPU: {cpu_model()}", file=sys.stderr)
    if clip_seconds:
        print(f"CLIP trained in {clip_seconds:.0f} s")
    print(f"projector: {args.steps} steps in {result['seconds']:.0f} s, loss {result['loss']:.3f}")
    print(f"'What colour is the shape?' over HTTP: {right}/{asked} right ({right / asked:.1%})")


if __name__ == "__main__":
    main()
