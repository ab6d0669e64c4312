"""Quick start: models, completions (whole and streamed), a task (wait, continue, fork), a prediction
(run, stream) and typed errors.

    python clients/examples/quickstart.py localhost:50051 [API_KEY]

Runs the same steps twice: with the synchronous Client, then with the AsyncClient.
"""

from __future__ import annotations

import asyncio
import sys

import rwkvd

PROMPT = "The RWKV language model is"


def run_sync(target: str, api_key: str | None) -> None:
    with rwkvd.Client(target, api_key=api_key) as client:
        for model in client.list_models():
            print(f"model {model.id} ({model.parameter_count:,} parameters, {model.backend} on {model.device})")

        response = client.complete(PROMPT, max_tokens=24, temperature=1.0, top_p=0.7, seed=42)
        print(f"complete: {response.text!r} [{response.usage.completion_tokens} tokens]")

        print("stream: ", end="")
        for event in client.complete_stream(PROMPT, max_tokens=24, stop=["\n\n"]):
            if event.HasField("delta"):
                print(event.delta.text, end="", flush=True)
            elif event.HasField("finished"):
                print(f" [{event.finished.usage.completion_tokens} tokens]")

        try:
            client.complete(PROMPT, temperature=9)
        except rwkvd.InvalidArgument as err:
            print(f"rejected as expected: {[v.field for v in err.field_violations]} ({err.reason})")

        # A task keeps its RNN state when it ends: continue it, or fork it into a new task.
        task = client.create_task(PROMPT, max_tokens=16, temperature=0.0).wait()
        print(f"task {task.task_id}: {task.result!r} [{task.finish_reason}]")
        task.continue_(" In short,", max_tokens=8).wait()
        fork = task.fork(persistent=False, max_tokens=8).wait()
        print(f"fork of {fork.parent_task_id}: {fork.result!r}")
        task.delete()

        # Predictions, as RockAI's and Replicate's clients run them.
        output = client.run(model=client.list_models()[0].id, input={"prompt": "Hello!", "max_tokens": 16})
        print(f"prediction: {''.join(output)!r}")


async def run_async(target: str, api_key: str | None) -> None:
    async with rwkvd.AsyncClient(target, api_key=api_key) as client:
        models = await client.list_models()
        response = await client.complete(PROMPT, model=models[0].id, max_tokens=24, seed=42)
        print(f"async complete: {response.text!r}")

        pieces = []
        async for event in client.complete_stream(PROMPT, max_tokens=24, seed=42):
            if event.HasField("delta"):
                pieces.append(event.delta.text)
        print(f"async stream matches: {''.join(pieces) == response.text}")

        try:
            await client.get_model("nobody/nothing")
        except rwkvd.NotFound as err:
            print(f"not found as expected: {err.resource}")

        task = await client.create_task(PROMPT, max_tokens=16, temperature=0.0)
        streamed = "".join([text async for text in task.stream()])
        print(f"async task stream matches: {streamed == (await task.refresh()).result}")

        print("async prediction: ", end="")
        async for chunk in client.stream(models[0].id, input={"prompt": "Hello!", "max_tokens": 16}):
            print(chunk, end="", flush=True)
        print()


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    target, api_key = argv[1], argv[2] if len(argv) == 3 else None
    try:
        run_sync(target, api_key)
        asyncio.run(run_async(target, api_key))
    except rwkvd.RwkvdError as err:  # e.g. Unavailable (no server there) or Unauthenticated (API key)
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
