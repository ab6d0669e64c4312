"""The OpenAI API through the unmodified openai SDK: chat and completions, whole and streamed, and its errors."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
import pytest_asyncio

from service.app import App
from tests.support import eventually, http_base, running_app

pytestmark = pytest.mark.asyncio(loop_scope="module")

DEMO = "local/rwkv7-demo"
ALIAS = "gpt-3.5-turbo"
HELLO = [{"role": "user", "content": "Hello there, how are you today?"}]
# Random weights: without ignore_eos a generation may end at once; greedy makes every text reproducible.
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}
SAMPLED: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def app() -> AsyncIterator[App]:
    async with running_app(**{"engine.model_aliases": (ALIAS,)}) as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(app: App) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=http_base(app) + "/v1", api_key="x", max_retries=0) as sdk:
        yield sdk


async def chat_text(client: openai.AsyncOpenAI, messages: Any = HELLO, **kw: Any) -> str:
    completion = await client.chat.completions.create(model=DEMO, messages=messages, **{**GREEDY, **kw})
    return completion.choices[0].message.content or ""


async def streamed_chat(client: openai.AsyncOpenAI, **kw: Any) -> tuple[dict[int, str], list[Any]]:
    """Text per choice index, and every chunk."""
    texts: dict[int, str] = {}
    chunks = []
    stream = await client.chat.completions.create(model=DEMO, stream=True, **kw)
    async for chunk in stream:
        chunks.append(chunk)
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    return texts, chunks


# Chat


async def test_chat_completion(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model=DEMO, messages=HELLO, **GREEDY)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == DEMO
    assert completion.system_fingerprint is None
    [choice] = completion.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert choice.logprobs is None
    usage = completion.usage
    assert usage is not None
    assert usage.completion_tokens == 12
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens is not None


async def test_an_alias_names_the_served_model(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model=ALIAS, messages=HELLO, **GREEDY)
    assert completion.model == DEMO  # as OpenAI answers with the model it ran
    assert completion.choices[0].message.content == await chat_text(client)


@pytest.mark.parametrize(
    "content",
    ["Tell me a story about a dragon.", "给我讲一个关于龙的故事。", "🐉🔥 story time! 😀👍🏽"],
    ids=["english", "chinese", "emoji"],
)
async def test_streamed_text_is_the_whole_text(client: openai.AsyncOpenAI, content: str) -> None:
    messages = [{"role": "user", "content": content}]
    whole = await chat_text(client, messages, max_tokens=40)
    texts, _ = await streamed_chat(client, messages=messages, **{**GREEDY, "max_tokens": 40})
    assert texts == {0: whole}


async def test_stream_chunks(client: openai.AsyncOpenAI) -> None:
    texts, chunks = await streamed_chat(client, messages=HELLO, **GREEDY)
    assert {c.id for c in chunks} == {chunks[0].id}
    assert {c.created for c in chunks} == {chunks[0].created}
    assert {c.model for c in chunks} == {DEMO}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    first, last = chunks[0].choices[0], chunks[-1].choices[0]
    assert (first.delta.role, first.delta.content) == ("assistant", "")
    assert last.finish_reason == "length"
    assert last.delta.content is None
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked for
    assert texts[0] == await chat_text(client)


async def test_stream_usage_chunk_when_asked(client: openai.AsyncOpenAI) -> None:
    _, chunks = await streamed_chat(client, messages=HELLO, stream_options={"include_usage": True}, **GREEDY)
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 12
    whole = await client.chat.completions.create(model=DEMO, messages=HELLO, **GREEDY)
    assert whole.usage is not None
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


async def test_n_choices_are_distinct_and_seeded(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model=DEMO, messages=HELLO, n=3, seed=7, **SAMPLED)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    texts = [c.message.content for c in completion.choices]
    assert len(set(texts)) > 1
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 36  # summed over the choices; the prompt counted once
    streamed, chunks = await streamed_chat(client, messages=HELLO, n=3, seed=7, **SAMPLED)
    assert streamed == dict(enumerate(texts))
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    finishes = [c.choices[0].index for c in chunks if c.choices[0].finish_reason == "length"]
    assert sorted(roles) == sorted(finishes) == [0, 1, 2]


async def test_the_same_seed_gives_the_same_text(client: openai.AsyncOpenAI) -> None:
    first = await chat_text(client, seed=1234, **SAMPLED)
    again = await chat_text(client, seed=1234, **SAMPLED)
    other = await chat_text(client, seed=4321, **SAMPLED)
    assert first == again
    assert first != other


@pytest.mark.parametrize("as_list", [False, True])
async def test_stop_sequences_end_the_text_before_them(client: openai.AsyncOpenAI, as_list: bool) -> None:
    full = await chat_text(client, max_tokens=30)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    stops: Any = [stop, "never appears ☃"] if as_list else stop
    completion = await client.chat.completions.create(
        model=DEMO, messages=HELLO, stop=stops, **{**GREEDY, "max_tokens": 30}
    )
    [choice] = completion.choices
    assert choice.message.content == expected
    assert choice.finish_reason == "stop"
    texts, chunks = await streamed_chat(client, messages=HELLO, stop=stops, **{**GREEDY, "max_tokens": 30})
    assert texts[0] == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_a_repeated_conversation_prefix_is_cached(client: openai.AsyncOpenAI) -> None:
    system = {"role": "system", "content": "You are a patient assistant who answers every question. " * 6}
    first = await client.chat.completions.create(model=DEMO, messages=[system, *HELLO], **GREEDY)
    follow_up = [
        system,
        *HELLO,
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And then?"},
    ]
    second = await client.chat.completions.create(model=DEMO, messages=follow_up, **GREEDY)
    assert second.usage is not None
    assert second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached is not None
    assert 0 < cached < second.usage.prompt_tokens


async def test_chat_logprobs(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model=DEMO, messages=HELLO, logprobs=True, top_logprobs=3, **GREEDY
    )
    [choice] = completion.choices
    assert choice.logprobs is not None
    content = choice.logprobs.content
    assert content is not None
    assert len(content) == 12
    assert b"".join(bytes(t.bytes or []) for t in content).decode() == choice.message.content
    for token in content:
        assert token.logprob <= 0
        assert len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token  # greedy picks the most likely
    _, chunks = await streamed_chat(client, messages=HELLO, logprobs=True, top_logprobs=3, **GREEDY)
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content or []]
    assert [t.token for t in streamed] == [t.token for t in content]


# Completions


async def test_completion_whole_and_streamed(client: openai.AsyncOpenAI) -> None:
    completion = await client.completions.create(model=DEMO, prompt="Once upon a time", **GREEDY)
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    [choice] = completion.choices
    assert choice.finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 12
    stream = await client.completions.create(
        model=ALIAS, prompt="Once upon a time", stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert {c.object for c in chunks} == {"text_completion"}
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (completion.usage.prompt_tokens, 12)


async def test_completion_echo_suffix_token_ids_and_several_prompts(client: openai.AsyncOpenAI) -> None:
    plain = await client.completions.create(model=DEMO, prompt="The sky is", **GREEDY)
    echoed = await client.completions.create(model=DEMO, prompt="The sky is", echo=True, **GREEDY)
    assert echoed.choices[0].text == "The sky is" + plain.choices[0].text
    fim = await client.completions.create(model=DEMO, prompt="def add(a, b):\n", suffix="\n    return c\n", **GREEDY)
    assert fim.choices[0].finish_reason == "length"
    ids = await client.completions.create(model=DEMO, prompt=[510, 8234, 369], **GREEDY)
    assert ids.usage is not None
    assert ids.usage.prompt_tokens == 3
    several = await client.completions.create(model=DEMO, prompt=["The sky is", "给我讲"], n=2, seed=3, **SAMPLED)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.usage is not None
    assert several.usage.completion_tokens == 48


async def test_completion_logprobs(client: openai.AsyncOpenAI) -> None:
    completion = await client.completions.create(model=DEMO, prompt="The sky is", logprobs=2, **GREEDY)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens is not None
    assert logprobs.token_logprobs is not None
    assert logprobs.top_logprobs is not None
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 12
    assert logprobs.text_offset is not None
    assert logprobs.text_offset[0] == 0
    assert all(
        len(top) <= 3 and token in top for token, top in zip(logprobs.tokens, logprobs.top_logprobs, strict=True)
    )


# Models


async def test_models_list_and_retrieve(client: openai.AsyncOpenAI) -> None:
    models = [m async for m in client.models.list()]
    assert [m.id for m in models] == [DEMO, ALIAS]
    assert all(m.object == "model" and m.owned_by == "local" and m.created > 0 for m in models)
    model = await client.models.retrieve(ALIAS)
    assert model.id == ALIAS
    # The served id has a slash: the path is Replicate's model route, which answers both clients' fields.
    served = await client.models.retrieve(DEMO)
    assert (served.id, served.object, served.owned_by) == (DEMO, "model", "local")
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("gpt-4")


# Errors


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"temperature": 9}, "temperature"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"n": 9}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c"}]}, "messages[0].role"),
        ({"extra_body": {"temperature": "hot"}}, "temperature"),
    ],
)
async def test_bad_requests_are_bad_request_errors_naming_the_param(
    client: openai.AsyncOpenAI, kw: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(**{"model": DEMO, "messages": HELLO, **kw})
    assert err.value.status_code == 400
    assert isinstance(err.value.body, dict)
    assert err.value.body["param"] == param
    assert err.value.type == "invalid_request_error"
    assert err.value.response.headers["x-should-retry"] == "false"


async def test_an_unknown_model_is_not_found(client: openai.AsyncOpenAI) -> None:
    for create in (
        client.chat.completions.create(model="gpt-4", messages=HELLO),
        client.completions.create(model="gpt-4", prompt="Hi"),
    ):
        with pytest.raises(openai.NotFoundError) as err:
            await create
        assert err.value.code == "model_not_found"


async def test_a_wrong_key_is_an_authentication_error() -> None:
    async with running_app(api_keys=("right",)) as app:
        base = http_base(app) + "/v1"
        async with openai.AsyncOpenAI(base_url=base, api_key="wrong", max_retries=0) as wrong:
            with pytest.raises(openai.AuthenticationError):
                await wrong.chat.completions.create(model=DEMO, messages=HELLO, max_tokens=1)
        async with openai.AsyncOpenAI(base_url=base, api_key="right", max_retries=0) as right:
            completion = await right.chat.completions.create(model=DEMO, messages=HELLO, max_tokens=1)
            assert completion.usage is not None


async def test_a_full_queue_is_a_rate_limit_error_and_abandoned_requests_free_their_slots() -> None:
    long: dict[str, Any] = {"max_tokens": 100_000, "extra_body": {"ignore_eos": True}}
    async with running_app(**{"engine.max_batch_size": 1, "engine.max_queued": 1}) as app:
        assert app.engine is not None
        engine = app.engine
        async with openai.AsyncOpenAI(base_url=http_base(app) + "/v1", api_key="x", max_retries=0) as sdk:
            running = await sdk.chat.completions.create(model=DEMO, messages=HELLO, stream=True, **long)
            await anext(aiter(running))  # holds the one slot
            waiting = asyncio.create_task(sdk.chat.completions.create(model=DEMO, messages=HELLO, **long))
            assert await eventually(lambda: engine.stats().waiting == 1)
            with pytest.raises(openai.RateLimitError) as err:
                await sdk.completions.create(model=DEMO, prompt="Hi", max_tokens=1)
            assert err.value.code == "rate_limit_exceeded"
            assert err.value.response.headers["retry-after"] == "1"
            assert "x-should-retry" not in err.value.response.headers  # the SDK may retry this one
            waiting.cancel()  # a non-streamed request whose client left, while it waits for a slot
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            assert await eventually(lambda: engine.stats().waiting == 0)
            await running.close()
            assert await eventually(lambda: engine.stats().slots_in_use == 0)
