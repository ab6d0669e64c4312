"""Chat: a completion of structured messages, then a session whose RNN state stays on the server (turns that
read only their new text, a turn cancelled halfway, resuming by id, export and import).

    python clients/examples/chat.py localhost:50051 [API_KEY]

The synchronous Client first, then the same session resumed with the AsyncClient.
"""

from __future__ import annotations

import asyncio
import sys

import rwkvd

SYSTEM = ("system", "You are a helpful assistant. Answer in one sentence.")


def run_sync(target: str, api_key: str | None) -> str:
    with rwkvd.Client(target, api_key=api_key) as client:
        # Stateless, as OpenAI's chat completions: the whole conversation every time.
        reply = client.complete_chat([SYSTEM, ("user", "What is RWKV?")], max_tokens=32, seed=1)
        choice = reply.choices[0]
        print(f"complete_chat: {choice.message.content!r} [{reply.usage.prompt_tokens} prompt tokens]")

        # A session: each turn reads only its own text on top of the state the last one left.
        with client.chat(history=[SYSTEM], max_tokens=24, temperature=0.7, seed=1) as chat:
            print(f"session {chat.id}")
            for question in ("What is RWKV?", "How is it different from a transformer?"):
                print(f"> {question}\n< ", end="")
                for text in chat.send(question):
                    print(text, end="", flush=True)
                turn = chat.last_turn  # how the turn ended: text, finish_reason, usage, timings
                assert turn is not None
                print(f"\n  [{turn.usage.prompt_tokens} new prompt tokens, {turn.usage.cached_tokens} from the state]")

            for _ in chat.send("Now count to a thousand.", max_tokens=1000):
                break  # leaving the loop cancels the turn; what it wrote stays in the state
            answer = chat.ask("Never mind. Thanks!")
            print(f"after a cancelled turn: {answer.text!r} [{answer.finish_reason}]")
            state = chat.export()  # bytes: keep them, or import them on another replica
        copy_id = client.import_session(state)
        print(f"exported {len(state):,} bytes, imported as {copy_id}")
        return chat.id


async def run_async(target: str, api_key: str | None, session_id: str) -> None:
    async with rwkvd.AsyncClient(target, api_key=api_key) as client:
        async with client.chat(session_id, max_tokens=24) as chat:  # resumed: same state, turns go on
            print(f"resumed: {chat.resumed}, {chat.session.turns} turns, {chat.session.state_tokens} state tokens")
            async for text in chat.send("One more question: who made it?"):
                print(text, end="", flush=True)
            print()
        try:
            await client.get_session("sess_unknown")
        except rwkvd.NotFound as err:
            print(f"not found as expected: {err.reason}")
        await client.delete_session(session_id)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    target, api_key = argv[1], argv[2] if len(argv) == 3 else None
    try:
        session_id = run_sync(target, api_key)
        asyncio.run(run_async(target, api_key, session_id))
    except rwkvd.RwkvdError as err:  # e.g. Unavailable (no server there) or Unauthenticated (API key)
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
