"""Load on `lmforge api`: N concurrent streamed chat requests against a server on loopback, then a table.

The server runs in this process on a free 127.0.0.1 port (a tiny random model with SmolLM2's tokenizer
unless --model is given) and stops when the requests are answered:
    python bench/api_load.py --requests 16 --max_tokens 32 --max_concurrency 1 --max_queue 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from threading import Thread

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def start_server(model: Path, args: argparse.Namespace) -> tuple[object, Thread, str]:
    """The api on a free loopback port, in a thread; returns (server, thread, base url)."""
    import uvicorn

    from lmforge.config import GenerationArguments, ModelArguments
    from lmforge.config.args import ApiArguments
    from lmforge.serve.api import ModelServer, create_app
    from lmforge.serve.api_guard import bind_socket
    from lmforge.serve.chat import ChatEngine, load_for_inference

    tokenizer, lm = load_for_inference(ModelArguments(model_name_or_path=str(model)))
    engine = ChatEngine(tokenizer, lm, GenerationArguments(max_new_tokens=args.max_tokens))
    api_args = ApiArguments(api_host="127.0.0.1", api_port=0, api_key=None, max_concurrency=args.max_concurrency,
                            max_queue=args.max_queue)
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(ModelServer(engine, api_args, "bench")), log_level="warning"))
    thread = Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def one_request(http: object, url: str, max_tokens: int, index: int) -> dict:
    """One streamed chat request: status, latency, time to first content, completion tokens."""
    body = {"model": "bench", "messages": [{"role": "user", "content": f"Request {index}: tell me a story."}],
            "max_tokens": max_tokens, "temperature": 1.0, "top_p": 1.0, "seed": index, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return {"status": response.status_code, "latency": time.perf_counter() - start}
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"status": 200, "latency": time.perf_counter() - start, "first": first, "tokens": tokens}


async def run_load(url: str, args: argparse.Namespace) -> tuple[list[dict], float]:
    """All requests at once; returns their results and the wall time."""
    import httpx

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=args.timeout) as http:
        results = await asyncio.gather(*(one_request(http, url, args.max_tokens, i) for i in range(args.requests)),
                                       return_exceptions=True)
    wall = time.perf_counter() - start
    return [r if isinstance(r, dict) else {"status": type(r).__name__} for r in results], wall


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] if ordered else float("nan")


def report(results: list[dict], wall: float, args: argparse.Namespace) -> str:
    """The table of one run."""
    answered = [r for r in results if r["status"] == 200]
    latencies = [r["latency"] for r in answered]
    firsts = [r["first"] for r in answered if r.get("first") is not None]
    tokens = sum(r["tokens"] for r in answered)
    rows = [("requests", args.requests), ("answered", len(answered)), ("dropped", len(results) - len(answered)),
            ("server max_concurrency / max_queue", f"{args.max_concurrency} / {args.max_queue}"),
            ("max_tokens", args.max_tokens), ("torch threads", args.torch_threads),
            ("latency p50 / p95 (s)", f"{percentile(latencies, .5):.2f} / {percentile(latencies, .95):.2f}"),
            ("first content p50 / p95 (s)", f"{percentile(firsts, .5):.2f} / {percentile(firsts, .95):.2f}"),
            ("completion tokens", tokens), ("wall time (s)", f"{wall:.2f}"),
            ("tokens/s (all requests)", f"{tokens / wall:.1f}")]
    return "\n".join(["| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--max_concurrency", type=int, default=1)
    parser.add_argument("--max_queue", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    parser.add_argument("--model", type=Path, help="model directory (default: a tiny random Llama)")
    parser.add_argument("--torch_threads", type=int, default=1,
                        help="torch intra-op threads (on a busy 2-core machine, 2 made the tiny model 8x slower)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from stage_parity import tiny_model

            args.model = tiny_model(Path(tmp) / "tiny", hidden=32)
        server, thread, url = start_server(args.model, args)
        try:
            results, wall = asyncio.run(run_load(url, args))
        finally:
            server.should_exit = True
            thread.join(timeout=30)
    print(report(results, wall, args))


if __name__ == "__main__":
    main()
