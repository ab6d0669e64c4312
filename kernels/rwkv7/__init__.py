"""RWKV-7 (x070) operators."""

from .naive import wkv7_step, wkv7_varlen

__all__ = ["wkv7_step", "wkv7_varlen"]
