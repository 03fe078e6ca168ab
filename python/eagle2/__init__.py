"""eagle2: EAGLE-2 speculative decoding (dynamic draft trees) for Hugging Face causal LMs.

    import eagle2
    gen = eagle2.load()                      # embedded default: SmolLM2-135M-Instruct + its head
    [r] = gen.generate(["Write a haiku about the sea."], max_new_tokens=64)
    print(r.text, r.tau)

`load(target, draft)` takes local folders (a HF checkpoint; an EAGLE-1/2 head, eagle2.draft,
or an EAGLE-3 head in the official layout, eagle2.draft3). `Generator.generate` decodes a batch of prompts (ragged lengths are fine) with
method "eagle2" (speculative), "vanilla" (plain decoding in the same loop) or "hf"
(transformers' own generate). Greedy EAGLE-2 output equals plain greedy decoding; sampling
preserves the target's distribution (temperature, then top_k, then top_p).
`model.generate(..., custom_generate=eagle2.custom_generate, draft_head=head)` runs EAGLE-2
behind transformers' own generate.

The names below are imported on first use, so that `import eagle2` (and `eagle2 --help`)
does not pay for torch and transformers until they are needed.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "DEFAULT_SHAPE": "api", "Generator": "api", "Result": "api", "load": "api",
    "DraftHead": "draft", "Eagle3Head": "draft3", "Sampling": "generate", "TreeShape": "tree", "custom_generate": "transformers_generate",
}
__all__ = sorted([*_EXPORTS, "__version__"])
__version__ = "0.2.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'eagle2' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
