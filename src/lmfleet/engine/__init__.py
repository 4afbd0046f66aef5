"""The inference engine: token ids in, token ids out.

No HTTP and no web framework here. The engine knows about tokenization only through
``tokenizer.py``, which the offline ``LLM`` and the async engine use to turn text into
ids and ids back into text.
"""

from __future__ import annotations

from lmfleet.engine.request import FinishReason, RequestOutput, SamplingParams

__all__ = ["FinishReason", "RequestOutput", "SamplingParams"]
