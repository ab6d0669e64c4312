"""The HTTP face of rwkvd: the REST/SSE dialects clients already speak, translated to domain calls."""
