from engines.protocol import GenerationRequest, SamplingParams


def chat(text: str, **sampling) -> GenerationRequest:
    sampling.setdefault("temperature", 0.0)
    return GenerationRequest(messages=({"role": "user", "content": text},), sampling=SamplingParams(**sampling))


async def collect(engine, request):
    """Run a request to the end; return (text, token_ids, deltas)."""
    deltas = [d async for d in engine.generate(request)]
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], deltas
