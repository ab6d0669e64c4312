"""The HTTP observation middleware's API label: which dialect a path belongs to."""

from __future__ import annotations

import pytest

from service.http.observe import api_for_path


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v1/chat/completions", "openai"),
        ("/v1/completions", "openai"),
        ("/v1/models", "openai"),
        ("/v1/models/gpt-3.5-turbo", "openai"),
        ("/v1/models/local/rwkv7-demo", "replicate"),
        ("/v1/models/local/rwkv7-demo/predictions", "replicate"),
        ("/v1/predictions/abc/stream", "replicate"),
        ("/v1/deployments/o/n/predictions", "replicate"),
        ("/v1/run", "replicate"),
        ("/v1/run_sse", "replicate"),
        ("/v1/tasks/tmp", "tasks"),
        ("/v1/tasks/TASK_1/stream", "tasks"),
        ("/health/ready", None),
        ("/metrics", None),
        ("/docs", None),
    ],
)
def test_api_for_path(path: str, api: str | None) -> None:
    assert api_for_path(path) == api
