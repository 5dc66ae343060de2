"""Teach the embedded model a task it cannot do with ``kvforge finetune``, then measure it served
over HTTP as ``model: codes`` against the base model.

    python benchmarks/lora_task.py [--codes 16] [--epochs 6] [--rank 16] [--workdir DIR]

The task: made-up codes (``QX-417``) stand for words (``lantern``). Training conversations ask
for a code in one of several phrasings; the evaluation asks for every code in a phrasing that
no training conversation uses. A reply is right when its first word is the code's word. The
script writes the data, runs ``kvforge finetune`` (printing training time and tokens/s), starts
``kvforge serve --lora-modules codes=ADAPTER``, asks each code under both model names and
prints the two accuracies with the CPU model.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from kvforge.config import default_model_path
from kvforge.entrypoints.bench.report import cpu_model

WORDS = (
    "lantern",
    "harbor",
    "violet",
    "granite",
    "meadow",
    "copper",
    "falcon",
    "orchard",
    "thunder",
    "saddle",
    "pepper",
    "glacier",
    "marble",
    "willow",
    "anchor",
    "cactus",
    "velvet",
    "canyon",
    "ember",
    "lagoon",
    "quartz",
    "tundra",
    "walnut",
    "zephyr",
)
TRAIN_PHRASES = (
    "What does the code {code} stand for?",
    "Decode {code}.",
    "Which word is {code}?",
    "Tell me the word behind code {code}.",
    "{code} means which word?",
    "Code {code}: what word is it?",
)
EVAL_PHRASE = "Please translate the code {code} into its word."
SYSTEM = "Answer with the single word the code stands for."


def make_codes(count: int, seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    letters = "BCDFGHJKLMNPQRSTVWXZ"
    codes: dict[str, str] = {}
    while len(codes) < count:
        code = f"{rng.choice(letters)}{rng.choice(letters)}-{rng.randrange(100, 1000)}"
        codes.setdefault(code, WORDS[len(codes) % len(WORDS)])
    return codes


def conversation(phrase: str, code: str, word: str | None = None) -> list[dict[str, str]]:
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": phrase.format(code=code)},
    ]
    if word is not None:
        messages.append({"role": "assistant", "content": word})
    return messages


def write_data(codes: dict[str, str], path: Path) -> int:
    lines = [
        json.dumps({"messages": conversation(phrase, code, word)})
        for code, word in codes.items()
        for phrase in TRAIN_PHRASES
    ]
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def first_word(text: str) -> str:
    match = re.search(r"[A-Za-z]+", text)
    return match.group(0).lower() if match else ""


def accuracy(url: str, model: str, codes: dict[str, str]) -> float:
    right = 0
    for code, word in codes.items():
        body = {
            "model": model,
            "messages": conversation(EVAL_PHRASE, code),
            "max_tokens": 8,
            "temperature": 0,
        }
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
        right += first_word(reply["choices"][0]["message"]["content"]) == word
    return right / len(codes)


def serve(adapter: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "kvforge.entrypoints.cli",
        "serve",
        "--port",
        str(port),
        "--served-model-name",
        "base",
        "--lora-modules",
        f"codes={adapter}",
        "--kv-cache-memory",
        "256MiB",
    ]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise RuntimeError("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codes", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=6)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--workdir", default=None, help="keep data and adapter here")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lora-task-"))
    work.mkdir(parents=True, exist_ok=True)
    codes = make_codes(args.codes, seed=0)
    num = write_data(codes, work / "train.jsonl")
    print(f"CPU: {cpu_model()}; {args.codes} codes, {num} training conversations")
    adapter = work / "adapter"
    tune = [
        sys.executable,
        "-m",
        "kvforge.entrypoints.cli",
        "finetune",
        default_model_path(),
        str(work / "train.jsonl"),
        str(adapter),
        "--rank",
        str(args.rank),
        "--epochs",
        str(args.epochs),
        "--learning-rate",
        str(args.learning_rate),
        "--batch-size",
        str(args.batch_size),
        "--eval-fraction",
        "0.1",
    ]
    subprocess.run(tune, check=True)
    metrics = json.loads((adapter / "finetune_metrics.json").read_text())
    print(
        f"training: {metrics['steps']} steps in {metrics['train_seconds']:.0f} s, "
        f"{metrics['train_tokens_per_s']:.0f} tokens/s, loss {metrics['train_loss_first']:.3f}"
        f" -> {metrics['train_loss_last']:.3f}, held-out token accuracy "
        f"{metrics.get('eval_accuracy', float('nan')):.3f}"
    )
    process = serve(adapter, args.port, work / "server.log")
    try:
        url = f"http://127.0.0.1:{args.port}"
        tuned, base = accuracy(url, "codes", codes), accuracy(url, "base", codes)
    finally:
        process.terminate()
        process.wait(timeout=60)
    print(f"served over HTTP, unseen phrasing: adapter {tuned:.0%}, base model {base:.0%}")


if __name__ == "__main__":
    main()
