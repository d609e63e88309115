"""The commands: `adapterhub demo --quick` (every section, a passing check) and `adapterhub serve` (a real process)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
from click.testing import CliRunner
from serving_setup import wait_until_serving

from adapterhub.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_demo_quick_prints_every_section_and_all_rows_match_their_solo_run():
    result = CliRunner().invoke(main, ["demo", "--quick"])
    assert result.exit_code == 0, result.output
    out = result.output
    for header in ("== 1. Base model", "== 2. Push", "== 3. Pull", "== 4. One mixed batch", "== 5. Check",
                   "== 6. Throughput"):
        assert header in out
    assert re.search(r"pushed LoRA r=8\s+as summarize@v1", out)
    assert re.search(r"pushed rsLoRA r=16\s+as sql@v1", out)
    assert re.search(r"pushed DoRA r=8\s+as translate@v1", out)
    assert re.search(r"translate\s+translate@v1\s+prod", out)  # the registry listing
    rows, total = map(int, re.search(r"(\d+)/(\d+) rows identical to the solo run", out).groups())
    assert rows == total == 8
    changed, adapter_rows = map(int, re.search(r"adapters change the output in (\d+)/(\d+)", out).groups())
    assert changed == adapter_rows == 6
    assert re.search(r"mixed batch .* \d+\s+\d\.\d\dx", out) and "merged into the base" in out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_serves_registry_adapters(registry):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "ADAPTERHUB_API_KEY"}
    command = [sys.executable, "-c", "from adapterhub.cli import main; main()", "serve", "--port", str(port),
               "--registry", registry.location, "--max-batch", "4", "--max-adapters", "2", "--max-seq", "64"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(process, url)
        body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
        base = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        adapted = httpx.post(f"{url}/v1/completions", json={**body, "model": "sql:prod"}, timeout=60).json()
        assert base["model"] == "tiny" and adapted["model"] == "sql:prod"
        assert adapted["choices"][0]["text"] != base["choices"][0]["text"]
        too_long = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 60}, timeout=60)
        assert too_long.status_code == 400 and "context of 64 tokens" in too_long.json()["error"]["message"]
        ids = {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert {"tiny", "sql@v1", "summarize"} <= ids
    finally:
        process.terminate()
        process.wait(30)
