"""Quick start: list the models, complete a prompt, stream a completion and handle a typed error.

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
