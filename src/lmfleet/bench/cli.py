"""``lmfleet bench serve`` and ``lmfleet bench offline``: flags, and the glue from
flags to a run, a table on stdout, and JSON and PNG files in the result directory.

Flag names follow ``vllm bench serve`` where it has one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from lmfleet.errors import ConfigError


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    bench = subparsers.add_parser(
        "bench",
        help="benchmark an OpenAI-compatible endpoint or the engine",
        description="Load generator: 'serve' drives any OpenAI-compatible HTTP endpoint "
        "(lmfleet, vLLM, TGI, a gateway); 'offline' drives the engine in-process.",
    )
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="MODE")

    serve = sub.add_parser(
        "serve",
        help="benchmark an OpenAI-compatible HTTP endpoint",
        description="Send a workload to an OpenAI-compatible endpoint on a schedule "
        "(Poisson or gamma arrivals, ramps, a concurrency cap, or a trace), stream "
        "every response, and report TTFT, TPOT, ITL, end-to-end latency, throughput "
        "and goodput as a table, JSON and PNG plots.",
    )
    _add_target_flags(serve)
    _add_arrival_flags(serve)
    _add_workload_flags(serve)
    _add_output_flags(serve, default_kind="serve")
    _add_monitor_flags(serve)
    serve.set_defaults(func=cmd_bench_serve)

    offline = sub.add_parser(
        "offline",
        help="benchmark the engine without HTTP",
        description="Run the same workloads through the engine in this process "
        "(lmfleet.engine.llm.LLM, token-id prompts, all submitted at once) and report "
        "output tokens/s and per-request latencies from the engine's own timestamps.",
    )
    _add_offline_engine_flags(offline)
    _add_workload_flags(offline)
    _add_output_flags(offline, default_kind="offline")
    offline.set_defaults(func=cmd_bench_offline)
    return bench


# ---- flags --------------------------------------------------------------------------------
def _add_target_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument(
        "--base-url",
        default="http://127.0.0.1:8000",
        help="the server's address, without the /v1 path (default: %(default)s)",
    )
    g.add_argument(
        "--endpoint-type",
        choices=["completions", "chat"],
        default="completions",
        help="/v1/completions with a text prompt, or /v1/chat/completions with messages "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--endpoint",
        help="path of the generation route; default: /v1/completions or /v1/chat/completions",
    )
    g.add_argument(
        "--model",
        help="model name to put in requests; default: the first one the target lists at /v1/models",
    )
    g.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY if set)",
    )
    g.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra HTTP header on every request (repeatable)",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds a request may take from send to the end of its stream, and the "
        "longest wait for one chunk (default: %(default)s)",
    )
    g.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="do not send ignore_eos=true (for endpoints that reject it); outputs may "
        "then end before max_tokens",
    )
    g.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (default: %(default)s)"
    )
    g.add_argument(
        "--extra-body",
        type=json.loads,
        default={},
        metavar="JSON",
        help="a JSON object merged into every request body, e.g. '{\"top_p\": 0.9}'",
    )
    g.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="a tokenizer.json (or a model directory holding one) to build prompts from "
        "that model's tokens; default: the simulator's word vocabulary, where one word "
        "is one token on sim: models",
    )


def _add_arrival_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("arrivals")
    g.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="requests per second; inf sends all at once (default: %(default)s)",
    )
    g.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="shape of the gamma-distributed gaps between requests (mean gap 1/rate): "
        "1 = Poisson, < 1 burstier, > 1 more even (default: %(default)s)",
    )
    g.add_argument(
        "--max-concurrency",
        type=int,
        help="most requests in flight at once; later ones wait for a free slot",
    )
    g.add_argument(
        "--ramp-up-strategy",
        choices=["linear"],
        help="move the request rate linearly from --ramp-up-start-rps to "
        "--ramp-up-end-rps over the run (replaces --request-rate)",
    )
    g.add_argument("--ramp-up-start-rps", type=float, help="request rate at the first request")
    g.add_argument("--ramp-up-end-rps", type=float, help="request rate at the last request")
    g.add_argument(
        "--trace-time-scale",
        type=float,
        default=1.0,
        help="with --dataset-name trace: replay this many times faster (default: %(default)s)",
    )


def _add_workload_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument(
        "--dataset-name",
        choices=["random", "file", "trace"],
        default="random",
        help="random: random prompts of the lengths below; file: prompts from "
        "--dataset-path (.txt, one per line, or .jsonl with 'prompt' and optional "
        "'output_tokens'); trace: timestamp, prompt_tokens, output_tokens and "
        "optional session_id per row of a .jsonl or .csv (default: %(default)s)",
    )
    g.add_argument("--dataset-path", help="the prompts or trace file")
    g.add_argument(
        "--num-prompts",
        type=int,
        default=1000,
        help="requests to send (a trace: at most this many rows; default: %(default)s)",
    )
    g.add_argument(
        "--random-input-len",
        type=int,
        default=1024,
        help="prompt tokens per request (per turn in a session), besides the shared "
        "prefix (default: %(default)s)",
    )
    g.add_argument(
        "--random-output-len",
        type=int,
        default=128,
        help="output tokens per request; also the max_tokens of file prompts "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="lengths uniform in len × [1 − r, 1 + r] (default: %(default)s)",
    )
    g.add_argument(
        "--random-prefix-len",
        type=int,
        default=0,
        help="tokens of a shared system prefix that starts every prompt, to exercise "
        "prefix caching (default: %(default)s)",
    )
    g.add_argument(
        "--num-turns",
        type=int,
        default=1,
        help="turns per multi-turn chat session: each turn's prompt is the history plus "
        "a new message; --num-prompts counts turns (default: %(default)s)",
    )
    g.add_argument(
        "--seed", type=int, default=0, help="seed of prompts and arrivals (default: %(default)s)"
    )


def _add_output_flags(p: argparse.ArgumentParser, *, default_kind: str) -> None:
    g = p.add_argument_group("results")
    g.add_argument(
        "--goodput",
        nargs="+",
        default=[],
        metavar="NAME:MS",
        help="SLOs for goodput, in milliseconds, e.g. --goodput ttft:500 tpot:50 "
        "(names: ttft, tpot, e2el)",
    )
    g.add_argument(
        "--metric-percentiles",
        default="50,90,99",
        help="comma-separated percentiles to report (default: %(default)s)",
    )
    g.add_argument(
        "--percentile-metrics",
        default="ttft,tpot,itl,e2el",
        help="comma-separated latencies to show in the table (default: %(default)s)",
    )
    g.add_argument(
        "--result-dir",
        help=f"directory for the JSON result and PNG plots (default: "
        f"bench-results/{default_kind}-DATE-TIME)",
    )
    g.add_argument(
        "--result-filename",
        default="result.json",
        help="name of the JSON result in --result-dir (default: %(default)s)",
    )
    g.add_argument("--no-save", action="store_true", help="print the table only; write no files")
    g.add_argument("--no-plots", action="store_true", help="write the JSON but no PNG plots")
    g.add_argument(
        "--save-detailed",
        action="store_true",
        help="also write every request's record (chunk times included) into the JSON",
    )
    g.add_argument("--label", help="free text stored in the JSON result")
    g.add_argument(
        "--no-progress",
        "--disable-tqdm",
        dest="progress",
        action="store_false",
        help="no progress bar",
    )


def _add_monitor_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("monitoring the target")
    g.add_argument(
        "--no-monitor",
        dest="monitor",
        action="store_false",
        help="do not poll the target's /state and /metrics",
    )
    g.add_argument(
        "--monitor-url",
        help="where to poll /state and /metrics (default: --base-url)",
    )
    g.add_argument(
        "--monitor-interval",
        type=float,
        default=1.0,
        help="seconds between polls (default: %(default)s)",
    )
    g.add_argument(
        "--monitor-metric",
        action="append",
        default=[],
        metavar="QUANTITY=METRIC",
        help="read QUANTITY (waiting, running, replicas, kv_cache_usage) from this "
        "Prometheus metric first (repeatable)",
    )


def _add_offline_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument(
        "--model",
        required=True,
        help="a Hugging Face checkpoint directory, or sim:PROFILE for the simulated "
        "accelerator (e.g. sim:llama-8b-h100)",
    )
    g.add_argument(
        "--sim-time-scale",
        type=float,
        help="sim: models only: run this many times faster than the profile says",
    )
    g.add_argument("--dtype", help="weight and activation dtype (default: the engine's)")
    g.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: the engine's)")
    g.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    g.add_argument("--block-size", type=int, help="tokens per KV cache block")
    g.add_argument("--kv-cache-memory", type=int, metavar="BYTES", help="KV cache budget in bytes")
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        help="fraction of accelerator memory the engine may use",
    )
    g.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_const",
        const=False,
        help="turn prefix caching off",
    )
    g.add_argument("--max-num-seqs", type=int, help="most sequences in one batch")
    g.add_argument("--max-num-batched-tokens", type=int, help="token budget of one engine step")


# ---- shared helpers -----------------------------------------------------------------------
def _percentiles(text: str) -> tuple[float, ...]:
    try:
        qs = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(
            f"metric-percentiles: expected numbers like 50,90,99; got {text!r}"
        ) from None
    if any(not 0 <= q <= 100 for q in qs):
        raise ConfigError("metric-percentiles: each must be in [0, 100]")
    return qs


def _workload(
    args: argparse.Namespace, id_range: tuple[int, int] | None, *, with_trace_scale: bool
):
    from lmfleet.bench.workloads import (
        WorkloadSpec,
        file_workload,
        random_ids,
        random_workload,
        trace_workload,
    )

    kw: dict[str, Any] = {}
    if id_range is not None:
        kw = {"id_low": id_range[0], "id_high": id_range[1]}
    spec = WorkloadSpec(
        num_prompts=args.num_prompts,
        input_len=args.random_input_len,
        output_len=args.random_output_len,
        range_ratio=args.random_range_ratio,
        prefix_len=args.random_prefix_len,
        num_turns=args.num_turns,
        seed=args.seed,
        **kw,
    )
    if args.dataset_name != "random" and not args.dataset_path:
        raise ConfigError(f"dataset-path: required with --dataset-name {args.dataset_name}")
    if args.dataset_name == "file":
        import numpy as np

        prefix = random_ids(spec.prefix_len, spec, np.random.default_rng(spec.seed))
        return file_workload(args.dataset_path, spec.num_prompts, spec.output_len, prefix)
    if args.dataset_name == "trace":
        scale = args.trace_time_scale if with_trace_scale else 1.0
        return trace_workload(
            args.dataset_path, spec, num_prompts=args.num_prompts, time_scale=scale
        )
    return random_workload(spec)


def _result_dir(args: argparse.Namespace, kind: str) -> Path | None:
    if args.no_save:
        return None
    if args.result_dir:
        return Path(args.result_dir)
    return Path("bench-results") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def _headers(args: argparse.Namespace) -> dict[str, str]:
    headers: dict[str, str] = {}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    for item in args.header:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"header: expected NAME=VALUE, got {item!r}")
        headers[name.strip()] = value.strip()
    return headers


def _config_echo(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"func", "api_key", "header", "command", "bench_command", "log_level"}
    return {k: v for k, v in vars(args).items() if k not in skip}


# ---- bench serve --------------------------------------------------------------------------
def cmd_bench_serve(args: argparse.Namespace) -> int:
    from lmfleet.bench import report
    from lmfleet.bench.arrivals import RampUp
    from lmfleet.bench.client import Target
    from lmfleet.bench.metrics import parse_slos, summarize, timeline
    from lmfleet.bench.monitor import MonitorSettings, with_extra_metric_names
    from lmfleet.bench.runner import ServeSettings, run_serve
    from lmfleet.bench.workloads import TokenizerRenderer, WordRenderer

    slos = parse_slos(args.goodput)
    percentiles = _percentiles(args.metric_percentiles)
    headers = _headers(args)
    for name in ("httpx", "httpcore"):  # one INFO line per request would flood the terminal
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    if not isinstance(args.extra_body, dict):
        raise ConfigError("extra-body: expected a JSON object")
    ramp = None
    if args.ramp_up_strategy:
        if args.ramp_up_start_rps is None or args.ramp_up_end_rps is None:
            raise ConfigError("ramp-up-strategy: needs --ramp-up-start-rps and --ramp-up-end-rps")
        ramp = RampUp(args.ramp_up_start_rps, args.ramp_up_end_rps)
    renderer: Any
    if args.tokenizer:
        renderer = TokenizerRenderer(args.tokenizer)
        id_range: tuple[int, int] | None = (renderer.id_low, renderer.id_high)
    else:
        renderer = WordRenderer.sim()
        id_range = None
    workload = _workload(args, id_range, with_trace_scale=True)
    target = Target(
        base_url=args.base_url,
        model=args.model or "",
        chat=args.endpoint_type == "chat",
        endpoint=args.endpoint,
        headers=headers,
        timeout_s=args.timeout,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        extra_body=args.extra_body,
    )
    monitor = None
    if args.monitor:
        monitor = MonitorSettings(
            base_url=args.monitor_url or args.base_url,
            interval_s=args.monitor_interval,
            metric_names=with_extra_metric_names(args.monitor_metric),
            headers=headers,
        )
    settings = ServeSettings(
        target=target,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        ramp=ramp,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        monitor=monitor,
        progress=args.progress,
    )
    run = asyncio.run(run_serve(settings, workload, renderer))
    requested = ramp.end_rps if ramp else args.request_rate
    if workload.timestamps is not None:
        requested = math.inf
    summary = summarize(
        run.records, run.duration_s, requested_rate=requested, slos=slos, percentiles=percentiles
    )
    model = run.model
    info = {
        "Target": target.url,
        "Model": model,
        "Workload": workload.name,
        "Client CPU (cores)": round(run.client_cpu_fraction, 3),
    }
    print(
        report.format_table(
            summary, info=info, metrics=[m.strip() for m in args.percentile_metrics.split(",")]
        )
    )
    out_dir = _result_dir(args, "serve")
    if out_dir is None:
        return 0
    bin_s = max(1.0, run.duration_s / 300)
    tl = timeline(run.records, run.duration_s, bin_s)
    doc = report.result_document(
        kind="serve",
        config={**_config_echo(args), "model": model, "url": target.url},
        summary=summary,
        timeline=tl,
        samples=run.samples,
        records=run.records if args.save_detailed else None,
        extra={
            "label": args.label,
            "started_at": run.started_at,
            "client_cpu_s": run.client_cpu_s,
            "client_cpu_cores": run.client_cpu_fraction,
        },
    )
    written = [report.write_json(doc, out_dir / args.result_filename)]
    if not args.no_plots:
        title = f"{model} @ {target.url}"
        written.append(report.plot_latency_cdfs(run.records, out_dir / "latency_cdf.png", title))
        written.append(report.plot_throughput(tl, out_dir / "throughput.png", title))
        q = report.plot_monitor(run.samples, out_dir / "queue.png", title)
        if q is not None:
            written.append(q)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0


# ---- bench offline ------------------------------------------------------------------------
def cmd_bench_offline(args: argparse.Namespace) -> int:
    from lmfleet.bench import report
    from lmfleet.bench.metrics import parse_slos, summarize
    from lmfleet.bench.offline import run_offline
    from lmfleet.bench.workloads import TokenizerRenderer
    from lmfleet.engine.llm import LLM

    slos = parse_slos(args.goodput)
    percentiles = _percentiles(args.metric_percentiles)
    settings = {
        name: getattr(args, name)
        for name in (
            "sim_time_scale", "dtype", "device", "max_model_len", "block_size",
            "gpu_memory_utilization", "enable_prefix_caching", "max_num_seqs",
            "max_num_batched_tokens",
        )
        if getattr(args, name) is not None
    }  # fmt: skip
    if args.kv_cache_memory is not None:
        settings["kv_cache_memory_bytes"] = args.kv_cache_memory
    t = time.perf_counter()
    llm = LLM(args.model, progress=args.progress, **settings)
    load_s = time.perf_counter() - t
    id_range = None
    if not args.model.startswith("sim:") and (Path(llm.core.model_dir) / "tokenizer.json").exists():
        tok = TokenizerRenderer(llm.core.model_dir)
        id_range = (tok.id_low, tok.id_high)
    workload = _workload(args, id_range, with_trace_scale=False)
    run = run_offline(llm, workload, seed=args.seed, progress=args.progress, load_s=load_s)
    summary = summarize(run.records, run.duration_s, slos=slos, percentiles=percentiles)
    info = {
        "Model": args.model,
        "Workload": workload.name,
        "Load time (s)": round(load_s, 2),
        "Prefix-cached prompt tokens": run.cached_tokens,
    }
    if args.sim_time_scale is not None:
        info["Sim time scale (times are wall-clock)"] = args.sim_time_scale
    print(
        report.format_table(
            summary,
            title="Offline Benchmark Result",
            info=info,
            metrics=[m.strip() for m in args.percentile_metrics.split(",")],
        )
    )
    out_dir = _result_dir(args, "offline")
    if out_dir is None:
        return 0
    doc = report.result_document(
        kind="offline",
        config=_config_echo(args),
        summary=summary,
        records=run.records if args.save_detailed else None,
        extra={"label": args.label, "load_s": load_s, "cached_tokens": run.cached_tokens},
    )
    written = [report.write_json(doc, out_dir / args.result_filename)]
    if not args.no_plots:
        written.append(
            report.plot_latency_cdfs(
                run.records, out_dir / "latency_cdf.png", f"{args.model} (offline)"
            )
        )
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0
