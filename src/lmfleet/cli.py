"""The ``lmfleet`` command line. ``print`` is used here and nowhere else."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from lmfleet import __version__
from lmfleet.engine_flags import add_shared_engine_flags, default_model
from lmfleet.errors import LmfleetError

__all__ = ["add_shared_engine_flags", "build_parser", "default_model", "main"]


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument(
        "--model",
        help="Hugging Face checkpoint directory (config.json, *.safetensors, "
        "tokenizer.json), a GGUF file (or a directory holding one), or a built-in model "
        "name. Default: the built-in smollm2-135m-instruct (alias default), a 98 MB "
        "SmolLM2-135M-Instruct GGUF that scripts/setup.sh installs",
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
        tokenizer=args.tokenizer,
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
    return default_model()


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
    from lmfleet.fleet.status_view import add_status_parser
    from lmfleet.fleet.up import add_up_parser
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
    add_up_parser(sub)
    add_status_parser(sub)
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
