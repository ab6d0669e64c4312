"""One log line per engine request at its end (logger rwkvd.requests): id, API, outcome, tokens and timings.

An engine observer, so every request is logged exactly once however it ended (finished, cancelled, cut
by a deadline or an error). The fields ride on the record (service/logs.py writes them as keys of the
JSON object, or as key=value pairs after the text message).
"""

from __future__ import annotations

import logging

from service.engine.observer import RequestSample, StepSample

log = logging.getLogger("rwkvd.requests")


class RequestLog:
    wants_origin = False

    def __init__(self, model: str) -> None:
        self._model = model

    def on_step(self, step: StepSample) -> None:
        pass

    def on_rejected(self, api: str, kind: str) -> None:
        pass  # refusals are the caller's error response, and in the access log

    def on_request_end(self, request: RequestSample) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        usage = request.usage
        fields: dict[str, object] = {
            "request_id": request.request_id,
            "api": request.api,
            "model": self._model,
            "finish_reason": request.reason.value,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cached_tokens": usage.cached_tokens,
            "queue_seconds": _seconds(request.queue_seconds),
            "prefill_seconds": _seconds(request.prefill_seconds),
            "ttft_seconds": _seconds(request.ttft_seconds),
            "e2e_seconds": _seconds(request.e2e_seconds),
            "tokens_per_second": round(request.tokens_per_second, 2),
        }
        if request.error is not None:
            fields["error"] = request.error
        log.info("request ended", extra={"fields": fields})


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
