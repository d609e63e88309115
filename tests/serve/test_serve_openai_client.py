"""The official `openai` Python client against the server (skipped when `openai` is not installed)."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.compat


def test_official_client_completions_streaming_chat_models_and_errors(served):
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    full = client.completions.create(model="sql:prod", prompt="Once upon", max_tokens=8, temperature=0)
    assert full.usage.completion_tokens == 8 and full.choices[0].finish_reason == "length"
    stream = client.completions.create(model="sql:prod", prompt="Once upon", max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == full.choices[0].text
    messages = [{"role": "user", "content": "hi"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    usage, whole = chunks[-1].usage, reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.prompt_tokens, whole.completion_tokens)
    # the same prompt again: its full blocks come from the prefix cache (the last token is always computed)
    assert usage.prompt_tokens_details.cached_tokens == (whole.prompt_tokens - 1) // 16 * 16 > 0
    assert {"tiny", "sql"} <= {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-task", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", temperature=-1)
