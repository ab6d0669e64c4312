"""Webhook delivery for predictions: POST the prediction to its URL on start, output, logs, completed.

Never blocks generation: notify() only marks what is due; one worker per prediction posts the
prediction as it is at send time, in order, output/logs at most every 500 ms (Replicate's throttle),
the final "completed" always, each post retried with backoff on network errors and 5xx answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx

from .predictions import Prediction, WebhookEvent

log = logging.getLogger("rwkvd.webhooks")

THROTTLE_SECONDS = 0.5
Render = Callable[[Prediction], dict[str, Any]]


class _Channel:
    def __init__(self) -> None:
        self.due: set[WebhookEvent] = set()
        self.wake = asyncio.Event()


class WebhookDelivery:
    def __init__(self, render: Render, attempts: int = 4, backoff: float = 0.5, timeout: float = 10.0) -> None:
        self._render = render
        self._attempts = attempts
        self._backoff = backoff
        self._client = httpx.AsyncClient(timeout=timeout, follow_redirects=False)
        self._channels: dict[str, _Channel] = {}
        self._workers: set[asyncio.Task[None]] = set()

    def notify(self, prediction: Prediction, event: WebhookEvent) -> None:
        channel = self._channels.get(prediction.id)
        if channel is None:
            channel = self._channels[prediction.id] = _Channel()
            worker = asyncio.create_task(self._deliver(prediction, channel), name=f"webhook-{prediction.id}")
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)
        channel.due.add(event)
        channel.wake.set()

    async def close(self, grace: float = 5.0) -> None:
        """Gives pending deliveries `grace` seconds, then stops."""
        if self._workers:
            await asyncio.wait(list(self._workers), timeout=grace)
        for worker in self._workers:
            worker.cancel()
        await self._client.aclose()

    async def _deliver(self, prediction: Prediction, channel: _Channel) -> None:
        last_progress = 0.0
        try:
            while True:
                await channel.wake.wait()
                channel.wake.clear()
                if WebhookEvent.START in channel.due:
                    channel.due.discard(WebhookEvent.START)
                    await self._post(prediction)
                progress = channel.due & {WebhookEvent.OUTPUT, WebhookEvent.LOGS}
                if progress and WebhookEvent.COMPLETED not in channel.due:
                    await asyncio.sleep(max(0.0, last_progress + THROTTLE_SECONDS - time.monotonic()))
                    channel.due -= progress
                    last_progress = time.monotonic()
                    await self._post(prediction)
                if WebhookEvent.COMPLETED in channel.due:
                    channel.due.clear()
                    await self._post(prediction)  # the final state, which includes every output
                    return
                if channel.due:
                    channel.wake.set()
        finally:
            self._channels.pop(prediction.id, None)

    async def _post(self, prediction: Prediction) -> None:
        url = prediction.webhook
        if not url:
            return
        body = self._render(prediction)
        for attempt in range(self._attempts):
            try:
                response = await self._client.post(url, json=body)
                if response.status_code < 500:
                    return
                log.warning("webhook %s answered %d", url, response.status_code)
            except httpx.HTTPError as exc:
                log.warning("webhook %s failed: %s", url, exc)
            if attempt + 1 < self._attempts:
                await asyncio.sleep(self._backoff * 2**attempt)
        log.error("webhook %s for prediction %s gave up after %d attempts", url, prediction.id, self._attempts)
