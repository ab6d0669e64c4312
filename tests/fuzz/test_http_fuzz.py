"""The HTTP APIs under random input: schemathesis against the OpenAPI document the server serves, and hypothesis
bodies for the routes that read their JSON by hand (their schema is thin: no request body at all).

Whatever a request holds, the answer is never a 5xx, and every 4xx with a JSON body names the problem in its
dialect's shape: RWKV-Server's {"detail": ...} (FastAPI's list of {loc, msg} for a malformed body), OpenAI's
{"error": {message, type, param, code}} with `param` naming a field the body has (or must have), and
Replicate's problem+json with `detail` (and `invalid_fields` naming inputs) for bad input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from service.http.openai_requests import ChatBody, CompletionBody
from service.http.rwkv_tasks import FIMRequest, TaskCreate
from tests.fuzz.conftest import EXAMPLES, ThreadedServer
from tests.fuzz.strategies import KEYS, MODEL, PREDICTION_INPUTS, TEXT_CHARS, json_values, mostly, texts

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def check_answer(response: httpx.Response | Any, body: Any = None, parameters: frozenset[str] = frozenset()) -> None:
    """No server error; a client error says what was wrong, in the shape of the dialect that answered.
    `parameters`: the operation's query, path and header parameters, which an error may name too."""
    status = response.status_code
    text = response.text
    assert status < 500, f"{status} {text[:500]} for {str(body)[:500]}"
    content_type = _content_type(response)
    if status < 400 or not content_type.startswith(("application/json", "application/problem")):
        return
    reply = response.json()
    given = (set(body) if isinstance(body, dict) else set()) | parameters
    if "error" in reply:  # OpenAI
        error = reply["error"]
        assert error["message"], reply
        assert error["type"] in ("invalid_request_error", "requests"), reply
        if status == 400 and error["code"] != "invalid_json":
            param = error["param"]
            assert param, f"no param named: {reply}"
            known = set(ChatBody.model_fields) | set(CompletionBody.model_fields)
            assert _root(param) in given | known, f"param {param!r} is no field of {str(body)[:300]}"
    elif content_type.startswith("application/problem+json"):  # Replicate
        assert reply["detail"], reply
        assert reply["status"] == status, reply
        if status == 422:
            fields = [f["field"] for f in reply["invalid_fields"]]
            assert fields, reply
            inputs = (
                set(body.get("input") or {})
                if isinstance(body, dict) and isinstance(body.get("input"), dict)
                else set()
            )
            for field in fields:
                root, _, rest = field.partition(".")
                if root == "input" and rest:
                    assert rest in inputs | set(PREDICTION_INPUTS), f"{field!r}: no such input in {str(body)[:300]}"
                else:
                    assert root in given | {"body", "version", "model", "webhook", "webhook_events_filter", "input"}, (
                        field
                    )
    else:  # RWKV-Server's task API, and FastAPI's own validation errors
        detail = reply["detail"]
        assert detail, reply
        if isinstance(detail, list):  # 422: where in the request, and why
            for problem in detail:
                assert problem["msg"], problem
                loc = problem["loc"]
                assert loc, problem
                assert loc[0] in ("body", "query", "path", "header"), problem
                if loc[0] == "body" and len(loc) > 1 and isinstance(loc[1], str):
                    fields = set(TaskCreate.model_fields) | set(FIMRequest.model_fields)
                    assert loc[1] in given | fields, f"{loc} names no field of {str(body)[:300]}"


def _content_type(response: Any) -> str:
    """The content type of an httpx response, or of schemathesis' (whose headers map to lists of values)."""
    value = response.headers.get("content-type") or ""
    return str(value[0] if isinstance(value, list) else value)


def _root(path: str) -> str:
    return re.split(r"[.\[]", path, maxsplit=1)[0]


@pytest.fixture(scope="module")
def http(server: ThreadedServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http_base, timeout=60) as client:
        yield client


# ---- schemathesis on the OpenAPI document ---------------------------------------------------------------


@pytest.fixture(scope="module")
def known(http: httpx.Client) -> dict[str, str]:
    """Path parameters that exist on the server, so that generated requests also get past "not found"."""
    task = http.post("/v1/tasks/create", json={"prompt": "Hello", "max_tokens": 3}).json()["task_id"]
    with http.stream("GET", f"/v1/tasks/{task}/stream") as followed:
        followed.read()  # to the end of the task's round
    prediction = http.post("/v1/predictions", json={"version": MODEL, "input": {"prompt": "Hi"}}).json()
    version = http.get(f"/v1/models/{MODEL}").json()["latest_version"]["id"]
    owner, name = MODEL.split("/")
    return {
        "task_id": task,
        "prediction_id": prediction["id"],
        "owner": owner,
        "name": name,
        "version": version,
        "model_id": version,
    }


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_openapi_operations_never_fail_inside(
    server: ThreadedServer, known: dict[str, str], mode: schemathesis.GenerationMode
) -> None:
    """Every operation of /openapi.json with schemathesis' requests: valid ones (positive) and ones that break
    the schema (negative); valid ones again with path parameters that exist."""
    schema = schemathesis.openapi.from_url(server.http_base + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 25
    for operation in operations:
        names = {p.name for p in operation.path_parameters}
        variants: list[dict[str, str] | None] = [None]
        if mode is schemathesis.GenerationMode.POSITIVE and names:
            variants.append({n: known[n] for n in names})
        for path_parameters in variants:
            fuzz_operation(operation, mode, path_parameters)


def fuzz_operation(operation: Any, mode: Any, path_parameters: dict[str, str] | None) -> None:
    parameters = frozenset(p.name for p in operation.iter_parameters())

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    def call(case: Any) -> None:
        response = case.call(timeout=60)
        try:
            check_answer(response, case.body if isinstance(case.body, dict) else None, parameters)
        except AssertionError as exc:
            raise AssertionError(f"{operation.label}: {exc}") from None

    try:
        call()
    except Unsatisfiable:  # nothing can break this operation's schema (no parameters, or only free strings)
        assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label


# ---- the routes that read their bodies by hand -----------------------------------------------------------

MESSAGE = st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["user", "system", "assistant", "developer"]), texts)},
    optional={"content": json_values},
)
OPENAI_COMMON = {
    "model": mostly(st.sampled_from(["", MODEL, "gpt-3.5-turbo"]), json_values),
    "max_tokens": mostly(st.integers(0, 6), json_values),
    "temperature": mostly(st.floats(0, 2), json_values),
    "top_p": json_values,
    "n": mostly(st.integers(1, 3), json_values),
    "stream": mostly(st.booleans(), json_values),
    "stream_options": json_values,
    "stop": json_values,
    "presence_penalty": json_values,
    "frequency_penalty": json_values,
    "seed": json_values,
    "logit_bias": json_values,
    "top_k": json_values,
    "min_tokens": json_values,
    "ignore_eos": json_values,
    "stop_token_ids": json_values,
}


def bodies(required: dict[str, st.SearchStrategy[Any]], optional: dict[str, st.SearchStrategy[Any]]) -> Any:
    """Mostly an object with the route's fields (each of any JSON type), sometimes any JSON at all."""
    return mostly(
        st.fixed_dictionaries(required, optional=optional),
        st.one_of(json_values, st.dictionaries(KEYS, json_values, max_size=4)),
    )


chat_bodies = bodies(
    {"messages": mostly(st.lists(MESSAGE, max_size=3), json_values)},
    {
        **OPENAI_COMMON,
        "max_completion_tokens": json_values,
        "logprobs": json_values,
        "top_logprobs": json_values,
        "response_format": json_values,
        "tools": json_values,
        "tool_choice": json_values,
    },
)
completion_bodies = bodies(
    {"prompt": mostly(texts | st.lists(st.integers(0, 70000), max_size=4), json_values)},
    {**OPENAI_COMMON, "suffix": json_values, "echo": json_values, "logprobs": json_values, "best_of": json_values},
)
prediction_inputs = mostly(
    st.fixed_dictionaries({"prompt": texts}, optional={k: json_values for k in PREDICTION_INPUTS if k != "prompt"}),
    json_values,
)
prediction_bodies = bodies(
    {"input": prediction_inputs},
    {
        "version": mostly(st.sampled_from([MODEL, f"{MODEL}:x"]), json_values),
        "model": json_values,
        "webhook": json_values,
        "webhook_events_filter": json_values,
        "stream": json_values,
    },
)
task_bodies = bodies(
    {"prompt": mostly(texts | st.lists(st.integers(-1, 70000), max_size=4), json_values)},
    {
        "max_tokens": mostly(st.integers(0, 6), json_values),
        "temperature": json_values,
        "top_k": json_values,
        "top_p": json_values,
        "presence_penalty": json_values,
        "repetition_penalty": json_values,
        "penalty_decay": json_values,
        "seed": json_values,
        "stream": json_values,
    },
)
ROUTES = {
    "/v1/chat/completions": chat_bodies,
    "/v1/completions": completion_bodies,
    "/v1/predictions": prediction_bodies,
    "/v1/run": prediction_bodies,
    "/v1/tasks/tmp": task_bodies,
}


def post_json(http: httpx.Client, path: str, body: Any) -> httpx.Response:
    # allow_nan: NaN and Infinity are sent as Python writes them; the server must refuse them cleanly.
    return http.post(path, content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"})


@pytest.mark.parametrize("path", ROUTES)
@FUZZ
@given(data=st.data())
def test_random_json_bodies_are_refused_by_field(http: httpx.Client, path: str, data: st.DataObject) -> None:
    body = data.draw(ROUTES[path], label="body")
    check_answer(post_json(http, path, body), body)


@pytest.mark.parametrize("path", ROUTES)
@FUZZ
@given(raw=st.one_of(st.binary(max_size=40), st.text(TEXT_CHARS, max_size=40).map(str.encode)))
def test_bodies_that_are_not_json_are_refused(http: httpx.Client, path: str, raw: bytes) -> None:
    check_answer(http.post(path, content=raw, headers={"content-type": "application/json"}))


def test_the_server_is_idle_after_the_fuzzing(server: ThreadedServer) -> None:
    assert server.idle()


@pytest.mark.parametrize("path", ["/v1/tasks/tmp", "/v1/tasks/create", "/v1/tasks/fim"])
@pytest.mark.parametrize("raw", ['{"prompt": "x", "temperature": NaN}', '{"prompt": "x", "top_p": {"a": -Infinity}}'])
def test_what_the_fuzzing_found(http: httpx.Client, path: str, raw: str) -> None:
    """A body with NaN or Infinity (Python's JSON parser takes them) made the task API answer 500: its 422 echoes
    the bad input, which JSON cannot hold."""
    response = http.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert any(
        problem["loc"][:2] in (["body", "temperature"], ["body", "top_p"]) for problem in response.json()["detail"]
    )
    check_answer(response, json.loads(raw))
