"""The batch engine: RWKV-7 model, state pool, continuous-batching scheduler, sampler, tokenizer.

The layers above use `EngineClient` (protocol.py) and one of its two makers, nothing else: `build_engine`
(local.py, the engine thread in this process) or `start_engine_process` (remote.py, the engine in a
process of its own, worker.py, spoken to over pipe.py).
"""
