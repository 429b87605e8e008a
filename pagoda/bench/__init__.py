"""`pagoda bench`: serving stress tests against any OpenAI-compatible endpoint,
and offline throughput / latency of the engine."""
