"""The ``lmfleet`` command line. ``print`` is used here and nowhere else."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from pathlib import Path

from lmfleet import __version__
from lmfleet.errors import LmfleetError

DEFAULT_MODEL_DIR = (
    Path(os.environ.get("LMFLEET_HOME", Path.home() / ".cache" / "lmfleet")) / "models"
)


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument(
        "--model",
        help="Hugging Face checkpoint directory (config.json, *.safetensors, "
        "tokenizer.json). Default: a random 'tiny' model created on first use under "
        f"{DEFAULT_MODEL_DIR}.",
    )
    g.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: %(default)s)"
    )
    g.add_argument(
        "--kv-cache-memory",
        type=int,
        metavar="BYTES",
        help="KV cache budget in bytes (default: 1 GiB on CPU; on a GPU, what "
        "--gpu-memory-utilization leaves)",
    )
    g.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        help="turn prefix caching off (on by default)",
    )
    add_shared_engine_flags(g)


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


def _engine_config(args: argparse.Namespace, model: str):
    from lmfleet.engine.config import (
        SchedulerConfig,
        apply_env,
        engine_config,
        quantization_setting,
    )

    cfg = engine_config(
        model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        seed=args.seed,
        attention_backend=args.attention_backend,
        quantization=quantization_setting(args.quantization),
        enforce_eager=args.enforce_eager,
        max_seq_len_to_capture=args.max_seq_len_to_capture,
        block_size=args.block_size,
        kv_cache_memory_bytes=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching,
        kv_cache_dtype=args.kv_cache_dtype,
        kv_cache_scales=args.kv_cache_scales,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        async_scheduling=args.async_scheduling,
    )
    sched: SchedulerConfig = apply_env(cfg.scheduler)
    from dataclasses import replace

    return replace(cfg, scheduler=sched)


def _resolve_model(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    from lmfleet.engine.models.presets import ensure_model

    path = ensure_model(DEFAULT_MODEL_DIR / "tiny", "tiny")
    print(
        f"[lmfleet] no --model given: using the random-weight 'tiny' model at {path}",
        file=sys.stderr,
    )
    return str(path)


# ---- lmfleet generate --------------------------------------------------------------
def _cmd_generate(args: argparse.Namespace) -> int:
    from lmfleet.engine.async_engine import AsyncEngine
    from lmfleet.engine.request import SamplingParams

    model = _resolve_model(args)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.sampling_seed,
        stop=tuple(args.stop or ()),
        ignore_eos=args.ignore_eos,
    )

    async def run() -> None:
        engine = AsyncEngine(_engine_config(args, model), progress=True)
        await engine.start()
        try:
            prompt: str | list[int] = args.prompt
            if args.chat:
                if engine.tokenizer is None:
                    raise LmfleetError("--chat needs a tokenizer in the model directory")
                prompt = engine.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
            t0 = time.perf_counter()
            n = 0
            first = None
            reason = None
            async for out in engine.generate(prompt, params):
                if first is None and out.token_ids:
                    first = time.perf_counter() - t0
                n += len(out.token_ids)
                sys.stdout.write(out.text)
                sys.stdout.flush()
                reason = out.finish_reason
            dt = time.perf_counter() - t0
            print()
            print(
                f"[lmfleet] {n} tokens in {dt:.2f}s ({n / dt:.1f} tok/s), "
                f"first token {1000 * (first or 0):.0f} ms, finish_reason={reason}",
                file=sys.stderr,
            )
        finally:
            await engine.shutdown()

    asyncio.run(run())
    return 0


# ---- lmfleet create-model ----------------------------------------------------------
def _cmd_create_model(args: argparse.Namespace) -> int:
    from lmfleet.engine.models.presets import create_model

    path = create_model(args.out_dir, args.preset, seed=args.seed)
    print(f"wrote a random-weight '{args.preset}' model to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lmfleet.bench.cli import add_bench_parser
    from lmfleet.engine.models.presets import PRESETS
    from lmfleet.gateway.serve import add_gateway_parser
    from lmfleet.server.serve import add_serve_parser

    parser = argparse.ArgumentParser(
        prog="lmfleet",
        description="Serve large language models: engine, replica server, gateway, autoscaler.",
    )
    parser.add_argument("--version", action="version", version=f"lmfleet {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default: %(default)s)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="stream a completion for one prompt to the terminal",
        description="Load a model and stream the completion of one prompt to stdout.",
    )
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument(
        "--chat", action="store_true", help="wrap the prompt as a user message in the chat template"
    )
    gen.add_argument(
        "--max-tokens", type=int, default=64, help="most tokens to generate (default: %(default)s)"
    )
    gen.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)"
    )
    gen.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)"
    )
    gen.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="keep the k most likely tokens; 0 = off (default: %(default)s)",
    )
    gen.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        help="drop tokens below min_p × the top probability (default: %(default)s)",
    )
    gen.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="HF-style repetition penalty (default: %(default)s)",
    )
    gen.add_argument(
        "--sampling-seed", type=int, default=None, help="per-request seed for reproducible sampling"
    )
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument(
        "--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token"
    )
    _add_engine_flags(gen)
    gen.set_defaults(func=_cmd_generate)

    cm = sub.add_parser(
        "create-model",
        help="write a random-weight model in the Hugging Face layout",
        description="Write config.json, model.safetensors and tokenizer files of a "
        "random-weight model. Presets: "
        + "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()),
    )
    cm.add_argument("out_dir", help="directory to write")
    cm.add_argument(
        "--preset",
        default="tiny",
        choices=sorted(PRESETS),
        help="model shape (default: %(default)s)",
    )
    cm.add_argument("--seed", type=int, default=0, help="weight seed (default: %(default)s)")
    cm.set_defaults(func=_cmd_create_model)
    add_serve_parser(sub)
    add_bench_parser(sub)
    add_gateway_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except LmfleetError as exc:
        print(f"lmfleet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
