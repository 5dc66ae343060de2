"""The runner's persistent copy of the requests it runs, updated in place from each step's diff.

Each request the runner holds owns a row of two preallocated arrays: its token ids
``[rows, max_tokens]`` and its block table ``[rows, max_blocks]``. A step only writes what
changed (new blocks, replaced entries, the tokens just sampled), and the flattened batch
(input ids, positions, slot mapping) is gathered from the rows with a few vectorized numpy
operations, so per-step host work follows the tokens computed, not the sequence lengths.
Arrays grow by doubling when a request outgrows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kvforge.core.step_io import CachedRequestData, NewRequestData
from kvforge.layers.forward_batch import ForwardBatch
from kvforge.multimodal import ImageInput
from kvforge.sampling_params import SamplingParams


@dataclass(slots=True, eq=False)
class CachedRequestState:
    """What the runner knows of one request."""

    request_id: str
    row: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    block_ids: list[int]
    num_computed_tokens: int
    lora_id: int = 0
    generator: torch.Generator | None = None
    # scratch of the current step: tokens scheduled
    num_scheduled: int = field(default=0)
    # Leading positions whose draft-model KV is written (spec_decode/draft.py); valid below
    # num_computed_tokens. A request sent whole trusts its computed (prefix-cached) blocks.
    draft_computed: int = field(default=0)
    # images: their placeholder spans and embeddings
    mm_inputs: list[ImageInput] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens known to the runner."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        """Length of the prompt."""
        return len(self.prompt_token_ids)


class InputBatch:
    """Rows of token ids and block tables for every request the runner holds."""

    def __init__(self, block_size: int, rows: int = 64, tokens: int = 1024) -> None:
        self.block_size = block_size
        self.token_ids = np.zeros((rows, tokens), dtype=np.int64)
        self.block_table = np.zeros((rows, -(-tokens // block_size)), dtype=np.int64)
        self.requests: dict[str, CachedRequestState] = {}
        self._free_rows = list(range(rows - 1, -1, -1))

    # --------------------------------------------------------------- updates
    def add(self, data: NewRequestData) -> CachedRequestState:
        """Hold a request sent whole (replacing an older copy after preemption)."""
        old = self.requests.get(data.request_id)
        generator = old.generator if old is not None else None
        if old is not None:
            self.remove(data.request_id)
        if not self._free_rows:
            self._grow_rows()
        state = CachedRequestState(
            data.request_id,
            self._free_rows.pop(),
            data.prompt_token_ids,
            list(data.output_token_ids),
            data.sampling_params,
            data.eos_token_ids,
            list(data.block_ids),
            data.num_computed_tokens,
            data.lora_id,
            generator,
        )
        state.draft_computed = data.num_computed_tokens
        state.mm_inputs = data.mm_inputs
        self.requests[data.request_id] = state
        tokens = state.prompt_token_ids + state.output_token_ids
        self._fit(len(tokens), len(state.block_ids))
        self.token_ids[state.row, : len(tokens)] = tokens
        self.block_table[state.row, : len(state.block_ids)] = state.block_ids
        return state

    def update(self, data: CachedRequestData) -> CachedRequestState:
        """Apply a running request's diff."""
        state = self.requests[data.request_id]
        state.num_computed_tokens = data.num_computed_tokens
        row = state.row
        if 0 <= data.num_kept_blocks < len(state.block_ids):
            del state.block_ids[data.num_kept_blocks :]
        for index, block_id in data.replaced_block_ids:
            state.block_ids[index] = block_id
            self.block_table[row, index] = block_id
        if data.new_block_ids:
            start = len(state.block_ids)
            state.block_ids.extend(data.new_block_ids)
            self._fit(0, len(state.block_ids))
            self.block_table[row, start : len(state.block_ids)] = data.new_block_ids
        return state

    def append_tokens(self, state: CachedRequestState, token_ids: list[int]) -> None:
        """Tokens the runner sampled for ``state`` this step."""
        start = state.num_tokens
        state.output_token_ids.extend(token_ids)
        self._fit(state.num_tokens, 0)
        self.token_ids[state.row, start : state.num_tokens] = token_ids

    def set_drafts(self, state: CachedRequestState, draft_ids: list[int]) -> None:
        """Draft tokens to run after ``state``'s known tokens this step (not part of them:
        the tokens the runner keeps overwrite them)."""
        start = state.num_tokens
        self._fit(start + len(draft_ids), 0)
        self.token_ids[state.row, start : start + len(draft_ids)] = draft_ids

    def remove(self, request_id: str) -> None:
        """Forget a finished (or resent) request and free its row."""
        state = self.requests.pop(request_id, None)
        if state is not None:
            self._free_rows.append(state.row)

    def _fit(self, num_tokens: int, num_blocks: int) -> None:
        rows, width = self.token_ids.shape
        if num_tokens > width:
            new_width = max(num_tokens, 2 * width)
            grown = np.zeros((rows, new_width), dtype=np.int64)
            grown[:, :width] = self.token_ids
            self.token_ids = grown
        blocks = max(num_blocks, -(-num_tokens // self.block_size))
        if blocks > self.block_table.shape[1]:
            grown = np.zeros((rows, max(blocks, 2 * self.block_table.shape[1])), dtype=np.int64)
            grown[:, : self.block_table.shape[1]] = self.block_table
            self.block_table = grown

    def _grow_rows(self) -> None:
        rows = self.token_ids.shape[0]
        self.token_ids = np.concatenate([self.token_ids, np.zeros_like(self.token_ids)])
        self.block_table = np.concatenate([self.block_table, np.zeros_like(self.block_table)])
        self._free_rows.extend(range(2 * rows - 1, rows - 1, -1))

    # ----------------------------------------------------------------- batch
    def forward_batch(self, states: list[CachedRequestState], device: torch.device) -> ForwardBatch:
        """The flattened batch of ``states``, each running ``state.num_scheduled`` tokens from
        its computed count."""
        starts = np.fromiter((s.num_computed_tokens for s in states), np.int64, len(states))
        query_lens = np.fromiter((s.num_scheduled for s in states), np.int64, len(states))
        return self.span_batch(states, starts, query_lens, device)

    def span_batch(
        self,
        states: list[CachedRequestState],
        starts: np.ndarray,
        query_lens: np.ndarray,
        device: torch.device,
    ) -> ForwardBatch:
        """The flattened batch of ``query_lens[i]`` tokens of ``states[i]`` from position
        ``starts[i]`` (int64 arrays)."""
        rows = np.fromiter((s.row for s in states), dtype=np.int64, count=len(states))
        num_tokens = int(query_lens.sum())
        seq_lens = starts + query_lens
        query_start = np.zeros(len(states), dtype=np.int64)
        np.cumsum(query_lens[:-1], out=query_start[1:])
        token_rows = np.repeat(rows, query_lens)
        positions = np.repeat(starts - query_start, query_lens) + np.arange(num_tokens)
        input_ids = self.token_ids[token_rows, positions]
        max_blocks = int(-(-seq_lens.max() // self.block_size))
        tables = self.block_table[rows, :max_blocks]
        slots = (
            self.block_table[token_rows, positions // self.block_size] * self.block_size
            + positions % self.block_size
        )

        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array)).to(device)

        batch = ForwardBatch(
            input_ids=tensor(input_ids),
            positions=tensor(positions),
            slot_mapping=tensor(slots),
            block_tables=tensor(tables),
            seq_lens=tensor(seq_lens),
            query_lens=tensor(query_lens),
            query_start_loc=tensor(query_start),
            block_size=self.block_size,
            max_seq_len=int(seq_lens.max()),
            max_query_len=int(query_lens.max()),
        )
        if any(s.mm_inputs for s in states):
            batch.mm_embeds = _image_rows(states, starts, query_lens, query_start, device)
        return batch


def _image_rows(
    states: list[CachedRequestState],
    starts: np.ndarray,
    query_lens: np.ndarray,
    query_start: np.ndarray,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows of the batch, image embeddings) for the image placeholders this step runs."""
    rows: list[torch.Tensor] = []
    vectors: list[torch.Tensor] = []
    for i, state in enumerate(states):
        start, end = int(starts[i]), int(starts[i] + query_lens[i])
        for image in state.mm_inputs:
            first = max(start, image.offset)
            last = min(end, image.offset + image.length)
            if first < last:
                rows.append(torch.arange(first, last) - start + int(query_start[i]))
                vectors.append(image.embeds[first - image.offset : last - image.offset])
    if not rows:
        return None
    return torch.cat(rows).to(device), torch.cat(vectors).to(device)
