"""A small gRPC load generator for the HTTP benchmark (ghz is not in Debian), and a null server
to measure its own ceiling.

    python -m benchmarks.grpc_load load --target 127.0.0.1:3001 --requests FILE --concurrency 10 --duration 10
    python -m benchmarks.grpc_load null --port 3002       # answers ModelInfer with a constant, no work

`load` keeps `concurrency` ModelInfer calls in flight (streams of one HTTP/2 connection, as a
gRPC client does) for `duration` seconds, cycling through pre-serialized requests (FILE: a
JSON list of base64 ModelInferRequest messages), and prints one line: RESULT requests seconds
errors p50_ms p95_ms p99_ms. Requests and responses stay bytes (identity serializers), so the
generator spends its time on gRPC itself; run against `null` on the server's core, its rate is
the most this generator can measure there.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time

import grpc

METHOD = "/inference.GRPCInferenceService/ModelInfer"


async def load(target: str, requests: list[bytes], concurrency: int, duration: float, channels: int) -> str:
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    opened = [grpc.aio.insecure_channel(target, options=options) for _ in range(channels)]
    calls = [ch.unary_unary(METHOD) for ch in opened]  # no serializers: bytes in, bytes out
    latencies: list[float] = []
    errors = 0
    # warm-up: one call per channel opens its connection
    for call in calls:
        await call(requests[0], timeout=30)
    stop_at = time.perf_counter() + duration

    async def caller(i: int) -> None:
        nonlocal errors
        call = calls[i % len(calls)]
        k = i
        while True:
            start = time.perf_counter()
            if start >= stop_at:
                return
            try:
                await call(requests[k % len(requests)], timeout=30)
            except grpc.RpcError:
                errors += 1
            latencies.append(time.perf_counter() - start)
            k += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    for ch in opened:
        await ch.close()
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0.0

    return f"RESULT {len(latencies)} {elapsed:.6f} {errors} {pct(0.5):.3f} {pct(0.95):.3f} {pct(0.99):.3f}"


async def null_server(port: int, response: bytes) -> None:
    """A gRPC server that answers every ModelInfer with the same bytes and does nothing else."""

    async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return response

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)}
    )
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("READY", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    lp = sub.add_parser("load")
    lp.add_argument("--target", required=True)
    lp.add_argument("--requests", required=True, help="JSON list of base64 ModelInferRequest messages")
    lp.add_argument("--concurrency", type=int, default=10)
    lp.add_argument("--duration", type=float, default=10)
    lp.add_argument("--channels", type=int, default=1, help="connections the calls share")
    np_ = sub.add_parser("null")
    np_.add_argument("--port", type=int, required=True)
    np_.add_argument("--response", default="", help="base64 ModelInferResponse to answer (default: empty)")
    a = p.parse_args(argv)
    import uvloop  # the loop the service's worker runs

    if a.command == "load":
        with open(a.requests) as f:
            requests = [base64.b64decode(r) for r in json.load(f)]
        print(uvloop.run(load(a.target, requests, a.concurrency, a.duration, a.channels)), flush=True)
    else:
        uvloop.run(null_server(a.port, base64.b64decode(a.response)))


if __name__ == "__main__":
    main()
