"""Prefix caching in the engine (fp32 tiny base): requests sharing a 44-token prompt prefix, under the base, under
one LoRA adapter on k/v (non-zero lora_B) and under two adapters on the same prompt, give the same greedy tokens
as with prefix caching off and as the request alone offline, with first-token log-probabilities within fp32
tolerance; the second request's prefill runs only its uncached suffix, and /metrics counts the hit tokens.
Under a KV budget that preempts rows, every request still completes with the tokens it gets without caching."""

from __future__ import annotations

import json
import math
import re

import httpx
import pytest
from click.testing import CliRunner
from serving_setup import make_base

from adapterhub.cli import main
from adapterhub.serve.api import create_app
from adapterhub.serve.engine import Engine, EngineConfig
from adapterhub.serve.requests import Delta, SamplingParams
from adapterhub.serve.server import serve_in_thread

# The tokenizer is byte-level with a BOS token: A and B are 48 tokens, the first 44 in common, so B finds two full
# blocks of 16 cached (the third block differs).
PREFIX = "Once upon a time, in a quiet village by the "
A, B = PREFIX[:43] + "sea:", PREFIX[:43] + "hill"
PARAMS = SamplingParams(max_tokens=12, logprobs=2)


def _run(registry, requests, enable: bool):
    """Serves the requests one after another; returns [(tokens, logprobs of the first token)], the prefill
    shapes the model saw, and the metrics text."""
    base = make_base()
    shapes = []
    base.model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    engine = Engine(base, registry, EngineConfig(max_batch=4, max_seq=128, enable_prefix_caching=enable))
    try:
        outputs = []
        for model, prompt in requests:
            handle = engine.submit(base.tokenizer.encode(prompt), model, PARAMS, is_streaming=False)
            logprobs = [lp for event in handle.events() if isinstance(event, Delta) for lp in event.logprobs]
            outputs.append(([lp.token for lp in logprobs], logprobs[0]))
        with serve_in_thread(create_app(engine, api_key="")) as url:
            metrics = httpx.get(f"{url}/metrics").text
    finally:
        engine.close()
    return outputs, [s for s in shapes if s[1] > 1], metrics


def _metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


@pytest.mark.parametrize("models, hits", [
    ((None, None), 32 + 32),  # B shares A's first two blocks; A again: 2 of its 3 blocks (the last token recomputed)
    (("sql:prod", "sql:prod"), 32 + 32),  # rsLoRA r=16 on q, k, v, o: the cached k/v carry the adapter
    (("summarize", "sql:prod"), 0 + 32),  # the same prompt under another adapter misses; A under sql again hits
])
def test_shared_prefix_outputs_equal_caching_off_and_offline(registry, offline, models, hits):
    tokenizer = make_base().tokenizer
    assert len(tokenizer.encode(A)) == len(tokenizer.encode(B)) == 48
    assert tokenizer.encode(A)[:44] == tokenizer.encode(B)[:44] and tokenizer.encode(A)[44] != tokenizer.encode(B)[44]
    first, second = models
    prompts = [A, B if first == second else A, A]
    requests = list(zip([first, second, second], prompts))
    on, on_shapes, on_metrics = _run(registry, requests, enable=True)
    off, off_shapes, off_metrics = _run(registry, requests, enable=False)
    for (model, prompt), (tokens_on, first_on), (tokens_off, first_off) in zip(requests, on, off):
        assert tokens_on == tokens_off and len(tokens_on) == PARAMS.max_tokens, (model, prompt)
        assert tokenizer.decode(tokens_on) == offline.complete(model, prompt, PARAMS.max_tokens)
        assert first_on.token == first_off.token
        assert math.isclose(first_on.logprob, first_off.logprob, abs_tol=1e-5)
        for (id_on, lp_on), (id_off, lp_off) in zip(first_on.top, first_off.top):
            assert id_on == id_off and math.isclose(lp_on, lp_off, abs_tol=1e-5)
    # Prefills the model ran (decode steps are 1 token): caching off, every prompt in full; on, a hit only the rest.
    assert off_shapes == [(1, 48)] * 3
    assert on_shapes == [(1, 48), (1, 16 if first == second else 48), (1, 16)]
    assert _metric(on_metrics, "adapterhub_prefix_cache_queries_total") == 3 * 48
    assert _metric(on_metrics, "adapterhub_prefix_cache_hits_total") == hits
    assert _metric(off_metrics, "adapterhub_prefix_cache_queries_total") == 0
    assert _metric(off_metrics, "adapterhub_prefix_cache_hits_total") == 0
    # Every block is available again: the cached ones count (evicted when new blocks are needed).
    assert _metric(on_metrics, "adapterhub_kv_cache_blocks_free") == _metric(on_metrics, "adapterhub_kv_cache_blocks")


def test_preempted_rows_with_prefix_caching_finish_with_the_tokens_they_get_without(registry, offline):
    """Eight requests of 47-49 tokens sharing 40, under two adapters and the base, within a budget of 7 blocks (one
    row of max_seq=96 takes 6): rows are preempted and recomputed (recomputations look the cache up too), and every
    answer equals caching off and the request alone."""
    shared = PREFIX[:39]
    models = [None, "sql:prod", None, "summarize"]
    requests = [(models[i % 4], shared + ["bay", "road", "mill", "sea"][i % 4] + " " * (i % 3 + 3), 14 + i % 5)
                for i in range(8)]
    per_block = 16 * make_base().kv_bytes_per_token()

    def serve(enable: bool):
        engine = Engine(make_base(), registry, EngineConfig(max_batch=8, max_seq=96, kv_cache_memory=7 * per_block,
                                                            enable_prefix_caching=enable))
        tokenizer = engine.base.tokenizer
        try:
            with engine._cv:  # all queued before the engine thread admits any
                handles = [engine.submit(tokenizer.encode(p), m, SamplingParams(max_tokens=n), is_streaming=False)
                           for m, p, n in requests]
            texts = [h.result()[0] for h in handles]
            return texts, engine.metrics.snapshot(), engine._rows.cache
        finally:
            engine.close()

    on, on_stats, cache = serve(True)
    off, off_stats, _ = serve(False)
    assert on_stats["preemptions"] >= 1 and off_stats["preemptions"] >= 1
    prompt_tokens = sum(len(make_base().tokenizer.encode(p)) for _, p, _ in requests)
    assert on_stats["prefix_cache_queries"] > prompt_tokens  # the recomputed rows' prompts + outputs looked up
    assert on_stats["prefix_cache_hits"] >= 32 and on_stats["requests"] == {"ok": len(requests)}
    assert on == off
    for (model, prompt, n), text in zip(requests, on):
        assert text == offline.complete(model, prompt, n), (model, prompt)
    assert cache.free_blocks == cache.num_blocks and cache.pool.cached > 0  # all released; some still cached


def test_serve_has_the_switch():
    help_text = CliRunner().invoke(main, ["serve", "--help"]).output
    assert "--enable-prefix-caching / --no-enable-prefix-caching" in help_text
    refused = CliRunner().invoke(main, ["serve", "--replicas", "2", "--no-enable-prefix-caching"])
    assert refused.exit_code != 0 and "--no-enable-prefix-caching" in refused.output
    assert EngineConfig().enable_prefix_caching  # on by default, as vLLM's
    engine = Engine(make_base(), None, EngineConfig(max_seq=64, enable_prefix_caching=False))
    try:
        assert engine.memory_summary().endswith("; prefix caching off")
    finally:
        engine.close()


def test_admission_counts_the_blocks_a_prompt_will_share(registry, offline):
    """A budget of 6 blocks: after A (48 tokens) finished, B and C (48 tokens, A's first two blocks in common) each
    need 4 blocks for their prompt and one more token; with the two cached blocks shared they need 2 + 2 + the 2
    shared ones, so both start in one prefill of their 16-token suffixes; without caching they go one at a time."""
    C = PREFIX[:43] + "lake"
    per_block = 16 * make_base().kv_bytes_per_token()

    def serve(enable: bool):
        base = make_base()
        shapes = []
        base.model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
        engine = Engine(base, registry, EngineConfig(max_batch=4, max_seq=64, kv_cache_memory=6 * per_block,
                                                     enable_prefix_caching=enable))
        tokenizer, params = base.tokenizer, SamplingParams(max_tokens=8)
        try:
            first = engine.submit(tokenizer.encode(A), "sql:prod", params, is_streaming=False).result()[0]
            with engine._cv:  # both queued before the engine thread looks
                handles = [engine.submit(tokenizer.encode(p), "sql:prod", params, is_streaming=False) for p in (B, C)]
            return [first, *(h.result()[0] for h in handles)], [s for s in shapes if s[1] > 1], engine.metrics.snapshot()
        finally:
            engine.close()

    on, on_shapes, on_stats = serve(True)
    off, off_shapes, _ = serve(False)
    assert on == off == [offline.complete("sql:prod", p, 8) for p in (A, B, C)]
    assert on_shapes == [(1, 48), (2, 16)] and off_shapes == [(1, 48), (1, 48), (1, 48)]
    assert on_stats["prefix_cache_hits"] == 64 and on_stats["preemptions"] == 0


def test_usage_reports_the_cached_prompt_tokens(registry):
    """usage.prompt_tokens_details.cached_tokens (OpenAI's field): 0 for a first prompt, the shared full blocks for
    a prompt starting the same (B after A: 32 of 48), in the stream's usage chunk too; 0 with caching off."""
    def cached(enable: bool) -> list[int]:
        engine = Engine(make_base(), registry, EngineConfig(max_batch=4, max_seq=128, enable_prefix_caching=enable))
        try:
            with serve_in_thread(create_app(engine, api_key="")) as url, httpx.Client(base_url=url, timeout=60) as c:
                out = []
                for prompt in (A, B):
                    body = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0}).json()
                    assert body["usage"]["prompt_tokens"] == 48
                    out.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
                stream = c.post("/v1/completions", json={"prompt": A, "max_tokens": 4, "temperature": 0, "stream": True,
                                                         "stream_options": {"include_usage": True}})
                chunks = [json.loads(line[6:]) for line in stream.text.splitlines()
                          if line.startswith("data: {")]
                out.append(chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"])
                return out
        finally:
            engine.close()

    assert cached(True) == [0, 32, 32]
    assert cached(False) == [0, 0, 0]


def test_a_next_turn_finds_the_answer_cached(registry, offline):
    """A finished request's blocks of prompt and answer are named too: a next turn whose prompt repeats both
    (A, its 19 fed answer tokens, then more) finds 64 tokens cached, not only A's 48; its tokens equal caching
    off and offline (fp32)."""
    tokenizer = make_base().tokenizer
    first = tokenizer.encode(A)
    params = SamplingParams(max_tokens=20)

    def turns(enable: bool):
        engine = Engine(make_base(), registry, EngineConfig(max_batch=4, max_seq=128, enable_prefix_caching=enable))
        try:
            answer = [lp.token for event in engine.submit(first, "sql:prod", SamplingParams(max_tokens=20, logprobs=0),
                                                          is_streaming=False).events()
                      if isinstance(event, Delta) for lp in event.logprobs]
            second = first + answer + tokenizer.encode(" And then?", add_special_tokens=False)
            events = list(engine.submit(second, "sql:prod", params, is_streaming=False).events())
            return answer, second, "".join(e.text for e in events if isinstance(e, Delta)), events[-1].cached_tokens
        finally:
            engine.close()

    answer, second, text_on, cached_on = turns(True)
    assert len(answer) == 20 and len(second) >= 65
    assert cached_on == 64  # A's 48 tokens and the first 16 answer tokens: 48 + 19 fed tokens hold 4 full blocks
    answer_off, _, text_off, cached_off = turns(False)
    assert answer_off == answer and text_on == text_off and cached_off == 0
    assert text_on == offline.complete("sql:prod", second, params.max_tokens)
