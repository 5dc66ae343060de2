"""SamplingMetadata: a batch's sampling parameters as tensors (the sampler sees no Requests)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvforge.sampling_params import SamplingParams


@dataclass
class SamplingMetadata:
    """Per-row parameters of the rows being sampled (R rows, V vocabulary)."""

    temperature: torch.Tensor  # [R], 0 for greedy rows
    is_greedy: torch.Tensor  # [R] bool
    top_k: torch.Tensor | None  # [R] int, 0 = off
    top_p: torch.Tensor | None  # [R]
    min_p: torch.Tensor | None  # [R]
    repetition_penalty: torch.Tensor | None  # [R]
    frequency_penalty: torch.Tensor | None  # [R]
    presence_penalty: torch.Tensor | None  # [R]
    # [R, max_len] token ids padded with V (an out-of-vocabulary bucket), only with penalties
    prompt_token_ids: torch.Tensor | None
    output_token_ids: torch.Tensor | None
    # (rows, token ids, biases) flattened over all rows with a logit_bias
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    # (rows, token ids) to forbid: stop tokens of rows below their min_tokens
    banned: tuple[torch.Tensor, torch.Tensor] | None
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    max_num_logprobs: int = 0  # 0 = only the sampled token's logprob
    # Some row asked for logprobs (so ranks are needed); False allows the fast path.
    needs_ranks: bool = True
    # [R, ceil(V / 32)] int32 allowed-token bits from grammars (all ones for free rows)
    grammar_bitmask: torch.Tensor | None = None

    @property
    def all_greedy(self) -> bool:
        """True when no row samples randomly."""
        return bool(self.is_greedy.all())

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        stop_ids: list[list[int]],
        generators: dict[int, torch.Generator],
        vocab_size: int,
        device: torch.device,
        grammar_bitmask: torch.Tensor | None = None,
    ) -> SamplingMetadata:
        """Collect tensors for rows with ``params``; ``stop_ids`` are banned per row (min_tokens)."""

        def column(
            values: list[float], neutral: float, dtype: torch.dtype = torch.float32
        ) -> torch.Tensor | None:
            if all(v == neutral for v in values):
                return None
            return torch.tensor(values, dtype=dtype, device=device)

        temperature = [0.0 if p.is_greedy else p.temperature for p in params]
        use_penalties = any(
            p.repetition_penalty != 1 or p.frequency_penalty or p.presence_penalty for p in params
        )
        bias_rows, bias_ids, bias_vals = [], [], []
        for row, p in enumerate(params):
            for token_id, bias in (p.logit_bias or {}).items():
                bias_rows.append(row)
                bias_ids.append(int(token_id))
                bias_vals.append(float(bias))
        ban_rows = [row for row, ids in enumerate(stop_ids) for _ in ids]
        ban_ids = [t for ids in stop_ids for t in ids]
        return cls(
            temperature=torch.tensor(temperature, device=device),
            is_greedy=torch.tensor([t == 0.0 for t in temperature], device=device),
            top_k=column([p.top_k for p in params], 0, torch.long),
            top_p=column([p.top_p for p in params], 1.0),
            min_p=column([p.min_p for p in params], 0.0),
            repetition_penalty=column([p.repetition_penalty for p in params], 1.0),
            frequency_penalty=column([p.frequency_penalty for p in params], 0.0),
            presence_penalty=column([p.presence_penalty for p in params], 0.0),
            prompt_token_ids=_pad(prompt_ids, vocab_size, device) if use_penalties else None,
            output_token_ids=_pad(output_ids, vocab_size, device) if use_penalties else None,
            logit_bias=(
                (
                    torch.tensor(bias_rows, device=device),
                    torch.tensor(bias_ids, device=device),
                    torch.tensor(bias_vals, device=device),
                )
                if bias_rows
                else None
            ),
            banned=(
                (torch.tensor(ban_rows, device=device), torch.tensor(ban_ids, device=device))
                if ban_rows
                else None
            ),
            generators=generators,
            max_num_logprobs=max((p.logprobs or 0 for p in params), default=0),
            needs_ranks=any(p.logprobs is not None for p in params),
            grammar_bitmask=grammar_bitmask,
        )


def _pad(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)
