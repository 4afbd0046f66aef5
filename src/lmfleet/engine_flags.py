"""The engine flags both commands that run an engine share, ``lmfleet generate`` and
``lmfleet serve``, with the same names and defaults; and the model they fall back to.

Its own module so that ``lmfleet.server`` never imports ``lmfleet.cli`` (which
imports the server back to build its parser). Part of the command line: printing to
stderr is allowed here, as in ``cli.py``.
"""

from __future__ import annotations

import argparse
import sys


def add_shared_engine_flags(g: argparse._ArgumentGroup) -> None:
    """The engine flags ``lmfleet generate`` and ``lmfleet serve`` share, with the
    same defaults (``--device``, ``--kv-cache-memory`` and the prefix-caching switch
    differ between them and stay with each). argparse checks the choices, so a typo
    fails before any weights load."""
    from lmfleet.engine.config import (
        ATTENTION_BACKENDS,
        KV_CACHE_DTYPES,
        KV_CACHE_SCALES,
        QUANTIZATIONS,
        describe_choices,
    )

    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight and activation dtype; auto = float32 on CPU, the checkpoint's half "
        "type on a GPU (default: %(default)s)",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        help="context length (default: the model's max_position_embeddings)",
    )
    g.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="a Hugging Face tokenizer directory (tokenizer.json) to use instead of the "
        "model's own; e.g. for a GGUF whose tokenizer lmfleet cannot rebuild",
    )
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=256,
        help="most sequences in one batch; env MAX_BATCH_SIZE (default: %(default)s)",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="token budget of one engine step; env MAX_NUM_BATCHED_TOKENS (default: %(default)s)",
    )
    g.add_argument(
        "--block-size", type=int, default=16, help="tokens per KV block (default: %(default)s)"
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of accelerator memory the engine may use; the KV cache gets what is "
        "left after the weights, the activation peak of a profiled forward at "
        "--max-num-batched-tokens, a 256 MiB reserve and other processes' memory "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--seed", type=int, default=0, help="seed of the shared sampler (default: %(default)s)"
    )
    g.add_argument(
        "--attention-backend",
        default="auto",
        choices=list(ATTENTION_BACKENDS),
        help=f"paged-attention implementation. {describe_choices(ATTENTION_BACKENDS)} "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--quantization",
        default="none",
        choices=list(QUANTIZATIONS),
        help="weight quantization of the decoder layers (embeddings and lm_head stay in "
        f"--dtype). {describe_choices(QUANTIZATIONS)} (default: %(default)s). A checkpoint "
        "stored in fp8 per channel or tensor (llm-compressor FP8/FP8_DYNAMIC, AutoFP8) "
        "serves its own fp8 weights with none or fp8; block-wise fp8 is dequantized at load",
    )
    g.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=list(KV_CACHE_DTYPES),
        help="storage dtype of the paged KV cache (queries and the attention math stay "
        f"in --dtype). {describe_choices(KV_CACHE_DTYPES)} (default: %(default)s)",
    )
    g.add_argument(
        "--kv-cache-scales",
        default="auto",
        choices=list(KV_CACHE_SCALES),
        help="with --kv-cache-dtype fp8, where each layer's K and V scales come from "
        "(a value is stored as value / scale). "
        f"{describe_choices(KV_CACHE_SCALES)} (default: %(default)s)",
    )
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="never capture CUDA graphs: every decode step launches its kernels one by "
        "one (slower at small batches; for debugging). By default, on CUDA with the "
        "Triton backend, decode steps of up to 512 sequences replay graphs captured at "
        "startup",
    )
    g.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="schedule and pack the next engine step while the current one runs on the "
        "GPU, feeding its sampled tokens to the next step on the device, so host time "
        "overlaps GPU time. A request's token that turns out to be a stop token costs "
        "one wasted step row (default: on for CUDA, off on CPU where nothing overlaps)",
    )
    g.add_argument(
        "--max-seq-len-to-capture",
        type=int,
        default=8192,
        metavar="TOKENS",
        help="decode steps whose sequences are all at most this long replay CUDA graphs; "
        "a longer context runs its steps eagerly (the graphs' block tables are this "
        "wide) (default: %(default)s)",
    )


def default_model() -> str:
    """The built-in model's name, after checking that it is installed (the error
    says which command installs it)."""
    from lmfleet.engine.models.builtin import DEFAULT_MODEL, builtin_model_path

    path = builtin_model_path(DEFAULT_MODEL)
    print(f"[lmfleet] no model given: using the built-in {DEFAULT_MODEL} ({path})", file=sys.stderr)
    return DEFAULT_MODEL
