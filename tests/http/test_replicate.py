"""The predictions API through the unmodified replicate-python client (and raw HTTP where the wire matters).

One real server per module; the client is synchronous, so every call runs in a thread while the
server keeps the test's event loop.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import httpx
import pytest
import pytest_asyncio
import replicate
from replicate.exceptions import ReplicateError

from service.app import App
from service.domain import prediction_input
from service.http import replicate as replicate_api
from tests.support import http_base, running_app

pytestmark = pytest.mark.asyncio(loop_scope="module")

DEMO = "local/rwkv7-demo"
T = TypeVar("T")
RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def app() -> AsyncIterator[App]:
    async with running_app() as server:
        yield server


@pytest.fixture(scope="module")
def client(app: App) -> replicate.Client:
    c = replicate.Client(api_token="x", base_url=http_base(app))
    c.poll_interval = 0.05  # polling (wait=False, .wait()) would sleep 0.5 s a round
    return c


@pytest_asyncio.fixture(loop_scope="module")
async def http(app: App) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=http_base(app), timeout=30) as c:
        yield c


def version_of(app: App) -> str:
    assert app.engine is not None
    return app.engine.model.version


def over_sse(chunks: list[str]) -> str:
    """The text as a stream carries it: a CR ends an SSE line, so CR LF and CR arrive as LF."""
    return "".join(chunks).replace("\r\n", "\n").replace("\r", "\n")


async def call(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


def short(prompt: str = "Hello", tokens: int = 8) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": tokens, "temperature": 0}


async def newest(http: httpx.AsyncClient) -> dict[str, Any]:
    page = (await http.get("/v1/predictions")).json()
    result: dict[str, Any] = page["results"][0]
    return result


async def test_run_model_returns_the_chunks(client: replicate.Client, http: httpx.AsyncClient) -> None:
    output = await call(lambda: client.run(DEMO, input=short()))
    assert isinstance(output, list)
    assert output
    assert all(isinstance(chunk, str) for chunk in output)
    final = await newest(http)
    assert final["status"] == "succeeded"
    assert "".join(output) == "".join(final["output"])


async def test_run_version_returns_an_iterator(app: App, client: replicate.Client, http: httpx.AsyncClient) -> None:
    ref = f"{DEMO}:{version_of(app)}"
    iterator = await call(lambda: client.run(ref, input=short("Tell me a story")))
    assert isinstance(iterator, Iterator)
    text = "".join(await call(lambda: list(iterator)))
    assert text == "".join((await newest(http))["output"])
    # Without waiting, run() polls and yields chunks as the output grows.
    polled = await call(lambda: "".join(client.run(ref, input=short("Tell me a story"), wait=False)))
    assert polled == text


async def test_prefer_wait_answers_terminal_or_starting_never_processing(http: httpx.AsyncClient) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    reply = await http.post(
        f"/v1/models/{DEMO}/predictions",
        json={"input": {"prompt": "Count", "max_tokens": 100_000}},
        headers={"Prefer": "wait=1"},
    )
    assert loop.time() - start < 3  # about the 1 s asked for, nowhere near the end of the run
    body = reply.json()
    assert reply.status_code == 201
    assert (body["status"], body["output"]) == ("starting", None)
    canceled = (await http.post(f"/v1/predictions/{body['id']}/cancel")).json()
    assert canceled["status"] == "canceled"
    # Short runs end within the wait; whatever the timing, the answer is never "processing".
    for tokens in (1, 16, 64):
        reply = await http.post(
            f"/v1/models/{DEMO}/predictions", json={"input": short(tokens=tokens)}, headers={"Prefer": "wait=1"}
        )
        assert reply.json()["status"] in ("succeeded", "starting")
    reply = await http.post(f"/v1/models/{DEMO}/predictions", json={"input": short()}, headers={"Prefer": "wait"})
    assert reply.json()["status"] == "succeeded"


async def test_stream_events_concatenate_to_the_output(client: replicate.Client, http: httpx.AsyncClient) -> None:
    events = await call(lambda: list(client.stream(DEMO, input=short("Why is the sky blue?", 16))))
    assert [e.event.value for e in events][-1] == "done"
    assert {e.event.value for e in events} <= {"output", "done"}
    assert "".join(str(e) for e in events) == over_sse((await newest(http))["output"])


@pytest.mark.parametrize(
    "prompt", ["Write a poem about the sea.", "请用中文写一首关于大海的诗。", "Reply in emoji 🌊🐚🦀✨"]
)
async def test_streamed_text_equals_the_final_output(client: replicate.Client, prompt: str) -> None:
    prediction = await call(lambda: client.predictions.create(model=DEMO, input=short(prompt, 24), stream=True))
    text = await call(lambda: "".join(str(event) for event in prediction.stream()))
    await call(prediction.reload)
    assert prediction.status == "succeeded"
    assert text == over_sse(prediction.output)


async def test_create_get_cancel(client: replicate.Client) -> None:
    long = {"prompt": "Count to a million", "max_tokens": 100_000}
    prediction = await call(lambda: client.predictions.create(model=DEMO, input=long))
    assert prediction.status in ("starting", "processing")
    got = await call(lambda: client.predictions.get(prediction.id))
    assert (got.id, got.model, got.input) == (prediction.id, DEMO, long)
    await call(prediction.cancel)
    assert prediction.status == "canceled"
    assert prediction.completed_at is not None
    again = await call(lambda: client.predictions.cancel(prediction.id))  # ended: 200 and unchanged
    assert (again.status, again.completed_at) == ("canceled", prediction.completed_at)
    with pytest.raises(ReplicateError) as err:
        await call(lambda: client.predictions.cancel("no-such-prediction"))
    assert err.value.status == 404


async def test_deployment_means_the_model(client: replicate.Client) -> None:
    prediction = await call(lambda: client.predictions.create(deployment=DEMO, input=short()))
    assert (prediction.status, prediction.model) == ("starting", DEMO)
    await call(prediction.wait)
    assert prediction.status == "succeeded"
    with pytest.raises(ReplicateError) as err:
        await call(lambda: client.deployments.predictions.create("someone/else", input=short()))
    assert err.value.status == 404


async def test_create_without_wait_then_wait(app: App, client: replicate.Client) -> None:
    version = version_of(app)
    prediction = await call(lambda: client.predictions.create(version=version, input=short()))
    assert prediction.status == "starting"
    assert prediction.version == version
    await call(prediction.wait)
    assert prediction.status == "succeeded"
    assert prediction.output
    assert prediction.metrics
    assert prediction.metrics["predict_time"] > 0
    assert "generated" in (prediction.logs or "")


async def test_list_pages_newest_first(client: replicate.Client, http: httpx.AsyncClient) -> None:
    ids = [(await http.post("/v1/predictions", json={"model": DEMO, "input": short(tokens=1)})).json()["id"]]
    for _ in range(6):
        ids.append((await http.post("/v1/predictions", json={"model": DEMO, "input": short(tokens=1)})).json()["id"])
    page = await call(lambda: client.predictions.list())
    assert 7 <= len(page.results) <= 100
    assert [p.id for p in page.results[:7]] == ids[::-1]
    seen: list[str] = []
    cursor: str | None = "/v1/predictions?page_size=3"
    while cursor is not None and len(seen) < 7:
        page = await call(lambda c=cursor: client.predictions.list(c))
        assert len(page.results) == 3
        seen += [p.id for p in page.results]
        cursor = page.next
        assert cursor is None or cursor.startswith("http://127.0.0.1:")
    assert seen[:7] == ids[::-1]
    raw = (await http.get("/v1/predictions?page_size=2")).json()
    assert set(raw) == {"next", "previous", "results"}
    assert raw["previous"] is None
    assert "page_size=2" in raw["next"]


async def test_prediction_json(app: App, http: httpx.AsyncClient) -> None:
    base = http_base(app)
    reply = await http.post("/v1/predictions", json={"version": f"{DEMO}:{version_of(app)}", "input": short()})
    assert reply.status_code == 201
    assert reply.headers["location"] == f"{base}/v1/predictions/{reply.json()['id']}"
    body = (await http.get(reply.headers["location"])).json()
    for _ in range(100):
        if body["status"] == "succeeded":
            break
        await asyncio.sleep(0.05)
        body = (await http.get(reply.headers["location"])).json()
    data = body.pop("data")
    assert data == body  # the RockAI copy
    pid = body["id"]
    assert body["model"] == DEMO
    assert body["version"] == version_of(app)
    assert (body["status"], body["error"], body["data_removed"], body["source"]) == ("succeeded", None, False, "api")
    assert body["urls"] == {
        "get": f"{base}/v1/predictions/{pid}",
        "cancel": f"{base}/v1/predictions/{pid}/cancel",
        "stream": f"{base}/v1/predictions/{pid}/stream",
        "web": f"{base}/v1/predictions/{pid}",
    }
    for key in ("created_at", "started_at", "completed_at"):
        assert RFC3339_Z.match(body[key]), body[key]
    assert body["created_at"] <= body["started_at"] <= body["completed_at"]
    assert {"predict_time", "total_time"} <= set(body["metrics"])
    assert "webhook" not in body
    # Without a public URL, URLs follow the host the client used.
    moved = (await http.get(f"/v1/predictions/{pid}", headers={"Host": "rwkv.example:8443"})).json()
    assert moved["urls"]["get"] == f"http://rwkv.example:8443/v1/predictions/{pid}"


async def test_models_and_versions(app: App, client: replicate.Client) -> None:
    version = version_of(app)
    model = await call(lambda: client.models.get(DEMO))
    assert (model.owner, model.name) == ("local", "rwkv7-demo")
    assert model.latest_version is not None
    assert model.latest_version.id == version
    versions = await call(lambda: client.models.get(DEMO).versions.list())
    assert [v.id for v in versions] == [version]
    got = await call(lambda: model.versions.get(version))
    output = got.openapi_schema["components"]["schemas"]["Output"]
    assert (output["type"], output["x-cog-array-type"]) == ("array", "iterator")
    for ref in (lambda: model.versions.get("0" * 64), lambda: client.models.get("someone/else")):
        with pytest.raises(ReplicateError) as err:
            await call(ref)
        assert err.value.status == 404


async def test_version_schema_lists_exactly_the_accepted_inputs() -> None:
    properties = replicate_api._INPUT_SCHEMA["properties"]
    assert set(properties) == set(prediction_input._FIELDS)
    kinds = {str: "string", int: "integer", float: "number"}
    for name, types in prediction_input._FIELDS.items():
        assert properties[name]["type"] == kinds.get(types[-1], "string"), name


@pytest.mark.parametrize(
    ("body", "status", "named"),
    [
        ({"model": DEMO, "input": {"prompt": "x", "foo": 1, "bar": 2}}, 422, ["input.foo", "input.bar"]),
        ({"model": DEMO, "input": {"prompt": "x", "max_tokens": "8"}}, 422, ["input.max_tokens"]),
        ({"model": DEMO, "input": {"prompt": "x", "max_tokens": -1}}, 422, ["input.max_tokens"]),
        ({"model": DEMO, "input": {"prompt": "x", "temperature": 99}}, 422, ["input.temperature"]),
        ({"model": DEMO, "input": {"max_tokens": 8}}, 422, ["input.prompt"]),
        ({"model": DEMO, "input": "x"}, 422, ["input"]),
        ({"input": {"prompt": "x"}}, 422, ["version"]),
        ({"version": 7, "input": {"prompt": "x"}}, 422, ["version"]),
        ({"model": DEMO, "input": {"prompt": "x"}, "webhook_events_filter": ["begin"]}, 422, ["webhook_events_filter"]),
        ({"model": DEMO, "input": {"prompt": "x"}, "webhook": "ftp://x"}, 422, ["webhook"]),
        ({"version": "0" * 64, "input": {"prompt": "x"}}, 404, []),
        ({"model": "someone/else", "input": {"prompt": "x"}}, 404, []),
        ([1, 2], 422, ["body"]),
    ],
)
async def test_bad_requests_are_problem_details(
    http: httpx.AsyncClient, body: Any, status: int, named: list[str]
) -> None:
    reply = await http.post("/v1/predictions", json=body)
    assert reply.status_code == status
    assert reply.headers["content-type"].startswith("application/problem+json")
    problem = reply.json()
    assert (problem["type"], problem["status"]) == ("about:blank", status)
    assert problem["title"]
    assert problem["detail"]
    for field in named:
        assert field in problem["detail"]
        assert field in [f["field"] for f in problem["invalid_fields"]]


async def test_other_bad_requests(client: replicate.Client, http: httpx.AsyncClient) -> None:
    for raw in (b'{"input": {', b'{"model": "local/rwkv7-demo", "input": {"prompt": "x", "temperature": NaN}}'):
        malformed = await http.post("/v1/predictions", content=raw, headers={"content-type": "application/json"})
        assert (malformed.status_code, malformed.json()["title"]) == (400, "Invalid JSON")
    missing = await http.get("/v1/predictions/no-such-prediction")
    assert (missing.status_code, missing.json()["status"]) == (404, 404)
    assert (await http.get("/v1/predictions/no-such-prediction/stream")).status_code == 404
    bad_wait = await http.post(f"/v1/models/{DEMO}/predictions", json={"input": short()}, headers={"Prefer": "wait=x"})
    assert bad_wait.status_code == 422
    assert "Prefer" in bad_wait.json()["detail"]
    bad_page = await http.get("/v1/predictions?page_size=0")
    assert bad_page.status_code == 422
    assert "page_size" in bad_page.json()["detail"]
    bad_cursor = await http.get("/v1/predictions?cursor=@@@")
    assert bad_cursor.status_code == 422
    assert "cursor" in bad_cursor.json()["detail"]
    # The client turns problem details into ReplicateError with the status and the detail.
    with pytest.raises(ReplicateError) as err:
        await call(lambda: client.run(DEMO, input={"prompt": "x", "colour": "blue"}))
    assert err.value.status == 422
    assert "input.colour" in (err.value.detail or "")


async def test_chunks_never_start_like_a_url(app: App, client: replicate.Client, http: httpx.AsyncClient) -> None:
    """replicate-python turns such strings into FileOutput objects (str() of a stream event then fails)."""
    created = await http.post("/v1/predictions", json={"model": DEMO, "input": {"prompt": "x", "max_tokens": 100_000}})
    manager = app.predictions
    assert manager is not None
    live = await manager.get(created.json()["id"])
    # The model cannot be made to write a URL: add output as the runner would (domain's own path).
    manager._output(live, "https://example.com/a.png")
    manager._output(live, "data:text/plain,hi")
    await http.post(f"/v1/predictions/{live.id}/cancel")
    prediction = await call(lambda: client.predictions.get(live.id))
    assert prediction.output
    assert all(isinstance(c, str) for c in prediction.output)
    assert not any(c.startswith(("https:", "data:")) for c in prediction.output)
    events = await call(lambda: list(prediction.stream()))
    text = "".join(str(e) for e in events)
    assert "https://example.com/a.png" in text
    assert "data:text/plain,hi" in text
    assert text == over_sse(prediction.output)


async def test_queue_full_is_429_with_retry_after() -> None:
    async with (
        running_app(
            **{"engine.max_batch_size": 1, "engine.max_queued": 0, "public_url": "https://rwkv.example/"}
        ) as app,
        httpx.AsyncClient(base_url=http_base(app)) as http,
    ):
        long = {"prompt": "x", "max_tokens": 40000, "min_tokens": 39999}
        busy = (await http.post(f"/v1/models/{DEMO}/predictions", json={"input": long})).json()  # the only slot
        reply = await http.post(f"/v1/models/{DEMO}/predictions", json={"input": short()})
        assert reply.status_code == 429
        assert int(reply.headers["retry-after"]) >= 1
        assert reply.json()["status"] == 429
        listed = (await http.get("/v1/predictions")).json()["results"]
        assert [p["id"] for p in listed] == [busy["id"]]  # the refused one was never stored
        await http.post(f"/v1/predictions/{busy['id']}/cancel")
        model = (await http.get(f"/v1/models/{DEMO}")).json()
        assert model["url"] == f"https://rwkv.example/v1/models/{DEMO}"  # the configured public URL wins
