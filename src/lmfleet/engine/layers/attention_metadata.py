"""The hand-off from the runner to the attention layers for one forward pass.

A step packs the new tokens of every scheduled sequence into one flat batch of
``T`` tokens. Sequence ``i`` owns tokens ``query_start_loc[i]:query_start_loc[i+1]``;
its keys and values live in the paged KV cache at the blocks listed in
``block_tables[i]``; after this step it has ``seq_lens[i]`` tokens of context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    #: (T,) int64: where each new token's K/V goes, ``block_id * block_size + offset``
    slot_mapping: torch.Tensor
    #: (B + 1,) int64 on the model's device: cumulative query lengths
    query_start_loc: torch.Tensor
    #: the same on the host, for Python-side loops
    query_start_loc_cpu: list[int]
    #: (B,) int64 on device: context length of each sequence after this step
    seq_lens: torch.Tensor
    #: the same on the host
    seq_lens_cpu: list[int]
    #: (B, max_blocks) int32 on device, padded with 0
    block_tables: torch.Tensor
    block_size: int
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1
