"""Test helper: lay sequences out in a paged KV cache and describe the step.

Plays the part of the block manager and runner in small tests: it hands out
blocks (shuffled, so block tables are not contiguous) and builds the
:class:`AttentionMetadata` for a batch of (new tokens, context) pairs.
"""

from __future__ import annotations

import random

import torch

from lmfleet.engine.layers.attention_metadata import AttentionMetadata


class BlockLayout:
    """Block tables for sequences whose ids are ``0..num_seqs-1``."""

    def __init__(self, num_blocks: int, block_size: int, seed: int = 0) -> None:
        self.block_size = block_size
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}

    def ensure(self, seq: int, length: int) -> list[int]:
        table = self.tables.setdefault(seq, [])
        while len(table) * self.block_size < length:
            table.append(self.free.pop())
        return table

    def metadata(self, steps: list[tuple[int, int, int]]) -> AttentionMetadata:
        """``steps`` lists ``(seq, num_new_tokens, seq_len_after_step)`` per sequence."""
        slots: list[int] = []
        starts = [0]
        tables = []
        for seq, q_len, seq_len in steps:
            table = self.ensure(seq, seq_len)
            for pos in range(seq_len - q_len, seq_len):
                slots.append(
                    table[pos // self.block_size] * self.block_size + pos % self.block_size
                )
            starts.append(starts[-1] + q_len)
            tables.append(table)
        width = max(len(t) for t in tables)
        block_tables = torch.zeros(len(steps), width, dtype=torch.int32)
        for row, table in enumerate(tables):
            block_tables[row, : len(table)] = torch.tensor(table, dtype=torch.int32)
        seq_lens = [s for _, _, s in steps]
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor(starts, dtype=torch.int64),
            query_start_loc_cpu=starts,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64),
            seq_lens_cpu=seq_lens,
            block_tables=block_tables,
            block_size=self.block_size,
            max_query_len=max(q for _, q, _ in steps),
            max_seq_len=max(seq_lens),
        )


def positions_for(steps: list[tuple[int, int, int]]) -> torch.Tensor:
    """(T,) absolute positions of the new tokens of ``steps``."""
    return torch.cat([torch.arange(s - q, s) for _, q, s in steps])
