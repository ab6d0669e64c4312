"""The batch engine: RWKV-7 model, state pool, continuous-batching scheduler, sampler, tokenizer.

The layers above use `EngineClient` (protocol.py) and `build_engine` (local.py) and nothing else.
"""
