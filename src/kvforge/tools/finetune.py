"""``kvforge finetune``: train a LoRA adapter on chat-formatted JSON Lines, on the CPU.

Data: one ``{"messages": [...]}`` conversation per line. Each conversation is rendered with the
model's chat template; the loss covers only the assistant turns' tokens (found by rendering each
prefix of the conversation: the tokens an assistant message adds to the prompt before it). A
fraction of the conversations is held out; evaluation reports their loss and token accuracy
(argmax equals the next assistant token).

Optimization: AdamW on the adapter only, linear warm-up then cosine decay, gradient
accumulation, gradient-norm clipping. Checkpoints (adapter, optimizer, schedule, step, random
state) go to ``OUT/checkpoint-STEP`` every ``save_every`` steps; ``resume`` continues from the
latest one. The result is a PEFT adapter directory (``OUT``) that ``transformers`` + ``peft``,
``kvforge serve --lora-modules`` and ``kvforge lora merge`` load.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kvforge.config import ModelConfig
from kvforge.errors import InvalidRequestError
from kvforge.loader import load_model
from kvforge.lora.adapter import TARGETS
from kvforge.lora.train import TrainableLoRA
from kvforge.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class FinetuneConfig:
    """What ``kvforge finetune`` trains (its flags)."""

    model: str
    data: str
    output: str
    target_modules: tuple[str, ...] = TARGETS
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    learning_rate: float = 2e-4
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_fraction: float = 0.1
    max_length: int = 512
    save_every: int = 0  # steps between checkpoints (0: at the end only)
    seed: int = 0
    dtype: str = "float32"
    resume: bool = False
    show_progress: bool = True
    # Mixture-of-experts models: weights of the load-balancing loss and the router z-loss
    # added to the language-model loss (Switch Transformer uses 0.01, ST-MoE 0.001 for z)
    router_aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.0
    # Quantization-aware training: "int4" / "int8" trains the adapters through weights rounded
    # to that grid, then writes the merged model quantized to ``output/quantized``
    qat: str | None = None
    qat_group_size: int = 128

    def check(self) -> None:
        """Refuse settings that cannot train."""
        if self.batch_size < 1 or self.grad_accum < 1 or self.max_length < 2:
            raise InvalidRequestError("batch size, accumulation >= 1 and max length >= 2")
        if not (self.learning_rate > 0 and self.epochs > 0 and 0 <= self.warmup_ratio < 1):
            raise InvalidRequestError("need learning rate > 0, epochs > 0, warm-up in [0, 1)")
        coefs = (self.router_aux_loss_coef, self.router_z_loss_coef)
        if not all(math.isfinite(c) and c >= 0 for c in coefs):
            raise InvalidRequestError("router loss coefficients must be finite and >= 0")
        if not 0 <= self.eval_fraction < 1 or self.max_grad_norm <= 0:
            raise InvalidRequestError("need eval fraction in [0, 1) and max grad norm > 0")
        if not self.target_modules or set(self.target_modules) - set(TARGETS):
            raise InvalidRequestError(
                f"LoRA targets must be among {', '.join(TARGETS)}", "target_modules"
            )
        if self.qat not in (None, "int4", "int8"):
            raise InvalidRequestError(f"qat must be int4 or int8, got {self.qat!r}", "qat")
        if not (1 <= self.rank <= 1024 and math.isfinite(self.alpha) and 0 <= self.dropout < 1):
            raise InvalidRequestError("need 1 <= rank <= 1024, a finite alpha, 0 <= dropout < 1")


@dataclass
class Example:
    """Token ids of one conversation and its labels (IGNORE outside assistant turns)."""

    input_ids: list[int]
    labels: list[int]


def tokenize_conversation(
    tokenizer: Tokenizer, messages: list[dict[str, Any]], max_length: int
) -> Example:
    """The conversation's tokens; labels on what each assistant message adds."""
    ids = tokenizer.encode_chat(messages, add_generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = tokenizer.encode_chat(messages[:i], add_generation_prompt=True) if i else []
        upto = tokenizer.encode_chat(messages[: i + 1], add_generation_prompt=False)
        if upto[: len(before)] != before or ids[: len(upto)] != upto:
            raise InvalidRequestError(
                "the chat template does not render each conversation prefix as a prefix of the "
                "whole: assistant turns cannot be told apart",
                "data",
            )
        labels[len(before) : len(upto)] = upto[len(before) :]
    ids, labels = ids[:max_length], labels[:max_length]
    return Example(ids, labels)


def load_dataset(path: str, tokenizer: Tokenizer, max_length: int) -> list[Example]:
    """Every conversation of a JSON Lines file, tokenized (one-line errors name the line)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidRequestError(f"cannot read the training data: {exc}", "data") from exc
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(
                f"{path} line {number}: not JSON ({exc.msg})", "data"
            ) from exc
        if isinstance(entry, dict) and isinstance(entry.get("text"), str):  # plain text
            ids = tokenizer.encode(entry["text"])[:max_length]
            if len(ids) < 2:
                raise InvalidRequestError(f"{path} line {number}: text too short", "data")
            examples.append(Example(ids, list(ids)))
            continue
        messages = entry.get("messages") if isinstance(entry, dict) else None
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise InvalidRequestError(
                f"{path} line {number}: needs a 'messages' list or a 'text' string", "data"
            )
        example = tokenize_conversation(tokenizer, messages, max_length)
        if all(label == IGNORE for label in example.labels[1:]):
            raise InvalidRequestError(f"{path} line {number}: no assistant tokens to learn", "data")
        examples.append(example)
    if not examples:
        raise InvalidRequestError(f"{path} holds no conversations", "data")
    return examples


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids [B, L] and next-token targets [B, L] (IGNORE where none)."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        targets[row, : len(e.labels) - 1] = torch.tensor(e.labels[1:])
    return ids, targets


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def evaluate(
    lora: TrainableLoRA, examples: list[Example], batch_size: int, pad_id: int
) -> dict[str, float]:
    """Mean loss and token accuracy over the assistant tokens of ``examples``."""
    lora.eval()
    total_loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            ids, targets = collate(examples[start : start + batch_size], pad_id)
            mask = targets != IGNORE
            logits = lora(ids, mask)
            total_loss += F.cross_entropy(logits, targets[mask], reduction="sum").item()
            correct += int((logits.argmax(-1) == targets[mask]).sum())
            count += int(mask.sum())
    lora.train()
    return {"loss": total_loss / max(1, count), "accuracy": correct / max(1, count)}


def _latest_checkpoint(output: Path) -> Path | None:
    found = sorted(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Train, evaluate, write the adapter to ``config.output``; returns the run's numbers."""
    config.check()
    torch.manual_seed(config.seed)
    loaded = load_model(
        ModelConfig(model=config.model, dtype=config.dtype), None, config.show_progress
    )
    tokenizer = loaded.tokenizer
    examples = load_dataset(config.data, tokenizer, config.max_length)
    rng = random.Random(config.seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    num_eval = int(len(examples) * config.eval_fraction)
    eval_set = [examples[i] for i in order[:num_eval]]
    train_set = [examples[i] for i in order[num_eval:]]
    pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    grid = None
    if config.qat is not None:
        from kvforge.tools.calibrated import check_grid

        bits = 4 if config.qat == "int4" else 8
        grid = check_grid(loaded.config, bits, config.qat_group_size, True)
    lora = TrainableLoRA(
        loaded.model,
        tuple(config.target_modules),
        config.rank,
        config.alpha,
        config.dropout,
        config.seed,
    )
    lora.fake_quant = grid
    params = [p for p in lora.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    batches_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = max(1, math.ceil(batches_per_epoch * config.epochs / config.grad_accum))
    warmup = max(1, int(total_steps * config.warmup_ratio))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total_steps)
    )
    output = Path(config.output)
    step = 0
    if config.resume and (checkpoint := _latest_checkpoint(output)) is not None:
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        lora.load_state_dict(state["lora"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        logger.info("resumed from %s (step %d of %d)", checkpoint, step, total_steps)
    # The batch order of every epoch follows from the seed, so a resumed run sees the same one.
    schedule = []
    for epoch in range(math.ceil(config.epochs)):
        epoch_order = list(range(len(train_set)))
        random.Random(config.seed * 1000 + epoch).shuffle(epoch_order)
        for start in range(0, len(epoch_order), config.batch_size):
            schedule.append(epoch_order[start : start + config.batch_size])
    schedule = schedule[: total_steps * config.grad_accum]
    lora.train()
    started, tokens, history = time.perf_counter(), 0, []
    bar = tqdm(
        total=total_steps, initial=step, desc="Fine-tuning", disable=not config.show_progress
    )
    while step < total_steps:
        optimizer.zero_grad(set_to_none=True)
        loss_sum, micro = 0.0, schedule[step * config.grad_accum : (step + 1) * config.grad_accum]
        weight = sum(
            sum(1 for x in train_set[i].labels[1:] if x != IGNORE) for b in micro for i in b
        )
        for indices in micro:
            batch = [train_set[i] for i in indices]
            ids, targets = collate(batch, pad_id)
            mask = targets != IGNORE
            logits = lora(ids, mask)
            loss = F.cross_entropy(logits, targets[mask], reduction="sum") / max(1, weight)
            router = lora.router_losses()
            if router is not None and (config.router_aux_loss_coef or config.router_z_loss_coef):
                balance, z = router
                coef_b, coef_z = config.router_aux_loss_coef, config.router_z_loss_coef
                loss = loss + (coef_b * balance + coef_z * z) / len(micro)
            loss.backward()
            loss_sum += loss.item()
            tokens += sum(len(e.input_ids) for e in batch)
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        history.append(loss_sum)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if config.save_every and step % config.save_every == 0 and step < total_steps:
            _save_checkpoint(lora, optimizer, scheduler, step, output, config)
    bar.close()
    elapsed = time.perf_counter() - started
    lora.save_peft(output, config.model)
    metrics: dict[str, Any] = {
        "steps": step,
        "train_loss_first": history[0] if history else None,
        "train_loss_last": history[-1] if history else None,
        "train_seconds": elapsed,
        "train_tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "num_train": len(train_set),
        "num_eval": len(eval_set),
    }
    if eval_set:
        metrics.update(
            {f"eval_{k}": v for k, v in evaluate(lora, eval_set, config.batch_size, pad_id).items()}
        )
    if grid is not None:  # the merged model on the grid it trained on
        from kvforge.tools.calibrated import write_quantized

        lora.merge_into_model()
        metrics["quantized"] = str(output / "quantized")
        write_quantized(loaded, output / "quantized", "rtn", grid, show_progress=False)
    (output / "finetune_metrics.json").write_text(
        json.dumps({**metrics, "config": asdict(config)}, indent=2)
    )
    logger.info("fine-tuned %s: %s", config.output, metrics)
    return metrics


def _save_checkpoint(
    lora: TrainableLoRA,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    output: Path,
    config: FinetuneConfig,
) -> None:
    directory = output / f"checkpoint-{step}"
    lora.save_peft(directory, config.model)
    state = {
        "lora": {k: v for k, v in lora.state_dict().items() if not k.startswith("model.")},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "torch_rng": torch.get_rng_state(),
    }
    torch.save(state, directory / "trainer_state.pt")
