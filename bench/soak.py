"""Soak: the real server under mixed, hostile, churning load for minutes; no 5xx, and resident memory flat.

    python -m bench.soak [--minutes 3] [--quick] [--clients 8]

`adapterhub serve` runs in a subprocess (the embedded tiny base in bf16, a temporary local registry of
four adapters, three pool slots so adapters are evicted) and its RSS is read from /proc every second.
Concurrent clients send completions with prompts of 1-2,000 characters to a mix of adapters and the base,
full and cancelled streams (the client disconnects mid-SSE), and bad requests (out-of-range fields, broken
JSON, unknown adapters); one more task churns adapters: pushes new versions, moves tags, loads and unloads.
The first 25 % of the run is warm-up (allocator pools, kernel caches). Exits 1 when any response is a 5xx
or the server's RSS at the end exceeds its RSS after warm-up by more than 10 %.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

TASKS = {  # task -> random_adapter options: LoRA, rsLoRA, DoRA; ranks and targets differ
    "summarize": dict(r=8, target_modules=("q_proj", "v_proj")),
    "sql": dict(r=16, use_rslora=True, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
    "translate": dict(r=4, use_dora=True, target_modules=("q_proj", "v_proj", "down_proj")),
    "classify": dict(r=8, target_modules=("gate_proj", "up_proj", "down_proj")),
}
MODELS = [None, "tiny", *TASKS, "sql:prod", "summarize@v1", "translate:prod"]
BAD_BODIES = [  # each must be a 4xx
    {"prompt": "hi", "temperature": -1}, {"prompt": "hi", "top_k": 2**63}, {"prompt": "hi", "top_p": 0},
    {"prompt": "hi", "max_tokens": 0}, {"prompt": [], "max_tokens": 2}, {"prompt": "hi", "seed": "x"},
    {"prompt": "hi", "stop": ["a"] * 9}, {"prompt": "hi", "model": "missing-task"}, {"max_tokens": 3},
    {"prompt": "x" * 2000, "max_tokens": 100}, {"prompt": "hi", "model": "sql@v999"},
]
BAD_RAW = [b'{"prompt": "hi",', b"[" * 50_000, b'{"prompt": "hi", "temperature": NaN}', b"null"]
MAX_RSS_GROWTH = 0.10
WARMUP_SHARE = 0.25


class Tally:
    """What the clients saw; updated from one event loop, read at the end."""

    def __init__(self) -> None:
        self.statuses: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()
        self.transport_errors: Counter[str] = Counter()
        self.server_errors: list[str] = []

        self.accepted_bad = 0  # bad requests answered 2xx: a hole in validation

    def record(self, kind: str, status: int, text: str = "") -> None:
        self.kinds[kind] += 1
        self.statuses[str(status)] += 1
        if status >= 500:
            self.server_errors.append(f"{kind} -> {status}: {text[:200]}")
        self.accepted_bad += kind.startswith("bad") and status < 400


def prompt_text(rng: random.Random) -> str:
    """1 to 2,000 ASCII characters, log-uniform: mostly short, some near the context (tiny: 2,048 tokens)."""
    length = int(round(10 ** rng.uniform(0, 3.3)))
    return "".join(rng.choices(string.ascii_letters + string.digits + "     .,", k=max(1, min(2000, length))))


def completion_body(rng: random.Random) -> dict:
    return {"model": rng.choice(MODELS), "prompt": prompt_text(rng), "max_tokens": rng.randint(1, 32),
            "temperature": rng.choice([0, 0.8]), "top_p": rng.choice([1.0, 0.9]), "seed": rng.randint(0, 99)}


async def client_loop(client: httpx.AsyncClient, rng: random.Random, until: float, tally: Tally) -> None:
    kinds = ["complete", "stream", "stream-cancel", "bad", "bad-raw"]
    while time.monotonic() < until:
        kind = rng.choices(kinds, weights=[10, 3, 3, 1, 1])[0]
        try:
            await send_one(client, rng, kind, tally)
        except httpx.TransportError as error:
            tally.transport_errors[type(error).__name__] += 1


async def send_one(client: httpx.AsyncClient, rng: random.Random, kind: str, tally: Tally) -> None:
    body = completion_body(rng)
    if kind == "complete":
        r = await client.post("/v1/completions", json=body)
        tally.record(kind, r.status_code, r.text)
    elif kind == "stream":
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = [line async for line in r.aiter_lines() if line]
        errors = [json.loads(line[6:])["error"] for line in lines if line.startswith('data: {"error"')]
        is_server_error = any(e["type"] == "server_error" for e in errors)  # failed after the 200 went out
        tally.record(kind, 500 if is_server_error else r.status_code, "\n".join(lines[-2:]))
    elif kind == "stream-cancel":  # the client goes away after the first chunk: the row must be freed
        async with client.stream("POST", "/v1/completions", json={**body, "max_tokens": 32, "stream": True}) as r:
            async for _ in r.aiter_lines():
                break
        tally.record(kind, r.status_code)
    elif kind == "bad":
        r = await client.post("/v1/completions", json=rng.choice(BAD_BODIES))
        tally.record(kind, r.status_code, r.text)
    else:
        r = await client.post("/v1/completions", content=rng.choice(BAD_RAW),
                              headers={"content-type": "application/json"})
        tally.record(kind, r.status_code, r.text)


async def churn_loop(client: httpx.AsyncClient, registry, shapes, rng: random.Random, until: float,
                     tally: Tally) -> None:
    """Every ~second: push a new version (and move 'prod' to it), or load / unload an adapter over HTTP."""
    from adapterhub.adapter import random_adapter

    loop = asyncio.get_running_loop()
    while time.monotonic() < until:
        await asyncio.sleep(rng.uniform(0.5, 1.5))
        task = rng.choice(list(TASKS))
        action = rng.choice(["push", "tag", "load", "unload"])
        if action == "push":
            adapter = random_adapter(shapes, seed=rng.randint(1000, 10**6), **TASKS[task])
            await loop.run_in_executor(None, lambda: registry.push(adapter, task, tags=("prod",)))
            tally.kinds["churn-push"] += 1
            continue
        if action == "tag":
            versions = await loop.run_in_executor(None, lambda: list(registry.log(task)))
            ref = str(rng.choice(versions).ref)
            await loop.run_in_executor(None, lambda: registry.tag(ref, "prod"))
            tally.kinds["churn-tag"] += 1
            continue
        try:
            if action == "load":
                r = await client.post("/v1/adapters", json={"ref": f"{task}:prod"})
            else:  # 400 when it is not loaded, 429 while a running request pins it: both expected
                r = await client.delete(f"/v1/adapters/{task}:prod")
            tally.record(f"churn-{action}", r.status_code, r.text)
        except httpx.TransportError as error:
            tally.transport_errors[type(error).__name__] += 1


class RssSampler(threading.Thread):
    """The server process's resident memory (MiB), once a second, with the time it was read."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            except (FileNotFoundError, ProcessLookupError):
                return
            self.samples.append((time.monotonic(), kib / 1024))

    def median_between(self, start: float, end: float) -> float:
        values = [mib for t, mib in self.samples if start <= t <= end]
        return statistics.median(values) if values else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(registry_dir: Path, port: int, log: Path) -> subprocess.Popen:
    """`adapterhub serve` in its own process; its stderr (logged errors) goes to `log`, never to a pipe that
    could fill up and stall it."""
    env = {k: v for k, v in os.environ.items() if k != "ADAPTERHUB_API_KEY"}
    command = [sys.executable, "-c", "from adapterhub.cli import main; main()", "serve", "--port", str(port),
               "--registry", str(registry_dir), "--dtype", "bfloat16", "--max-adapters", "3", "--max-batch", "8"]
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited at startup:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process
        except httpx.TransportError:
            if time.monotonic() > deadline:
                process.kill()
                raise SystemExit("the server did not come up in 180 s") from None
            time.sleep(0.2)


def generated_tokens(url: str) -> int:
    text = httpx.get(f"{url}/metrics").text
    return int(float(next(line.split()[1] for line in text.splitlines()
                          if line.startswith("adapterhub_generated_tokens_total "))))


async def run_load(url: str, registry, shapes, seconds: float, clients: int, tally: Tally) -> None:
    until = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        workers = [client_loop(client, random.Random(i), until, tally) for i in range(clients)]
        await asyncio.gather(*workers, churn_loop(client, registry, shapes, random.Random(99), until, tally))


def report(tally: Tally, rss: RssSampler, warm_end: float, end: float, tokens: int, seconds: float,
           is_alive: bool) -> int:
    # Medians over a window (10 % of the run, at least 5 s): a 2,000-token bf16 prefill moves RSS by
    # hundreds of MiB for a moment.
    window = max(5.0, 0.1 * (end - warm_end) / (1 - WARMUP_SHARE))
    warm = rss.median_between(warm_end - window / 2, warm_end + window / 2)
    final = rss.median_between(end - window, end + 1.5)
    growth = (final - warm) / warm
    fives = sum(n for status, n in tally.statuses.items() if status.startswith("5"))
    print(f"requests by status: {dict(sorted(tally.statuses.items()))}")
    print(f"requests by kind:   {dict(sorted(tally.kinds.items()))}")
    print(f"transport errors:   {dict(tally.transport_errors) or 0}")
    print(f"bad accepted (2xx): {tally.accepted_bad}")
    print(f"5xx responses:      {fives}" + "".join(f"\n  {line}" for line in tally.server_errors[:10]))
    print(f"generated tokens/s: {tokens / seconds:.1f} ({tokens} tokens in {seconds:.0f} s after warm-up)")
    print(f"server RSS:         {warm:.1f} MiB after warm-up, {final:.1f} MiB at the end: {growth * 100:+.1f} % "
          f"(limit +{MAX_RSS_GROWTH * 100:.0f} %; min {min(m for _, m in rss.samples):.1f}, "
          f"max {max(m for _, m in rss.samples):.1f} MiB over {len(rss.samples)} samples)")
    failures = [f"{fives} 5xx responses"] * (fives > 0)
    failures += [f"RSS grew {growth * 100:.1f} %"] * (growth > MAX_RSS_GROWTH)
    failures += ["the server process died"] * (not is_alive)
    start = rss.samples[0][0] if rss.samples else 0.0
    trace = " ".join(f"{mib:.0f}" for t, mib in rss.samples[::5])
    print(f"server RSS every 5 s (MiB, warm-up ends at {warm_end - start:.0f} s): {trace}")
    print("FAIL: " + "; ".join(failures) if failures else "PASS")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="30 s: checks that the soak itself works")
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    seconds = 30.0 if args.quick else args.minutes * 60

    from adapterhub.adapter import random_adapter
    from adapterhub.registry import Registry
    from adapterhub.runtime import load_base

    shapes = load_base("tiny").module_shapes()
    with tempfile.TemporaryDirectory(prefix="adapterhub-soak-") as tmp:
        registry = Registry(Path(tmp) / "registry")
        for seed, (task, options) in enumerate(TASKS.items(), start=1):
            registry.push(random_adapter(shapes, seed=seed, **options), task, tags=("prod",))
        port = free_port()
        log = Path(tmp) / "server.log"
        process = start_server(Path(tmp) / "registry", port, log)
        url = f"http://127.0.0.1:{port}"
        rss = RssSampler(process.pid)
        rss.start()
        tally = Tally()
        try:
            print(f"soak: {seconds:.0f} s, {args.clients} clients, server pid {process.pid} on {url} "
                  f"(tiny base, bf16, {len(TASKS)} adapters in 3 slots)")
            asyncio.run(run_load(url, registry, shapes, seconds * WARMUP_SHARE, args.clients, tally))
            warm_end, tokens_before = time.monotonic(), generated_tokens(url)
            asyncio.run(run_load(url, registry, shapes, seconds * (1 - WARMUP_SHARE), args.clients, tally))
            end = time.monotonic()
            time.sleep(1.5)  # one more RSS sample after the load
            tokens = generated_tokens(url) - tokens_before
            is_alive = process.poll() is None
        finally:
            rss.stop.set()
            process.terminate()
            process.wait(30)
        server_log = log.read_text()
    if server_log.strip():
        print("server stderr (last 2,000 characters):\n" + server_log[-2000:])
    sys.exit(report(tally, rss, warm_end, end, tokens, end - warm_end, is_alive))


if __name__ == "__main__":
    main()
