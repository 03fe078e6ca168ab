"""EAGLE-2 behind transformers' own `generate`: a `custom_generate` decoding method.

    import eagle2
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=64,
                         custom_generate=eagle2.custom_generate, draft_head=head)

transformers (5.x) prepares the generation config, the attention mask and the stopping
criteria, then calls this function in place of its own decoding loop, passing the extra keyword
arguments of its signature (draft_head, tree_shape) through. The prompts (left padding
removed) are decoded by eagle2's loop; the result is what `generate` returns: the input ids
followed by the new tokens, rows that ended early padded with the pad token. Greedy output
equals transformers' greedy output (tested), sampling keeps its distribution (temperature,
top-k, top-p). Logits processors beyond those (repetition penalty, bad words, ...) are refused.
"""
from __future__ import annotations

import torch

from .generate import Sampling, decode
from .tree import TreeShape

# generation_config fields eagle2 implements, with the value that means "off" for the others.
_UNSUPPORTED = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "min_new_tokens": None,
                "min_length": 0, "num_beams": 1, "num_return_sequences": 1, "renormalize_logits": False,
                "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
                "forced_eos_token_id": None, "sequence_bias": None, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
                "typical_p": 1.0, "min_p": None, "encoder_repetition_penalty": 1.0}
DEFAULT_TREE = TreeShape(total_tokens=16, depth=4, branching=4)


def custom_generate(model, input_ids: torch.LongTensor, logits_processor=None, stopping_criteria=None, generation_config=None,
             synced_gpus: bool = False, streamer=None, draft_head=None, tree_shape: TreeShape | None = None,
             **model_kwargs) -> torch.LongTensor:
    """transformers' `custom_generate` entry point (see the module doc). draft_head: an
    attached-or-not eagle2 DraftHead for `model` (required); tree_shape: the draft tree
    (default 16/4/4). Returns [B, L + new tokens] like `generate`."""
    if draft_head is None:
        raise ValueError("draft_head: eagle2.custom_generate needs an EAGLE draft head (generate(..., draft_head=head))")
    cfg = generation_config
    for name, off in _UNSUPPORTED.items():
        value = getattr(cfg, name, off)
        if value not in (off, None) and not (off == 0 and value == 0):
            raise ValueError(f"generation_config.{name}={value!r}: not supported by eagle2.custom_generate")
    draft_head.attach(model)
    mask = model_kwargs.get("attention_mask")
    rows = input_ids.tolist()
    if mask is not None:  # left padding: keep each row's real tokens
        rows = [[t for t, keep in zip(r, m) if keep] for r, m in zip(rows, mask.tolist())]
    max_new = cfg.max_new_tokens if cfg.max_new_tokens is not None else cfg.max_length - input_ids.shape[1]
    sampling = Sampling(cfg.temperature or 1.0, cfg.top_p if cfg.top_p is not None else 1.0, cfg.top_k or 0) \
        if cfg.do_sample else Sampling()
    eos = cfg.eos_token_id
    eos = frozenset([eos] if isinstance(eos, int) else (eos.tolist() if torch.is_tensor(eos) else eos or []))
    stream = (lambda row, new: streamer.put(torch.tensor([new]))) if streamer is not None else None  # noqa: E731
    seed = int(torch.randint(2**62, (1,))) if cfg.do_sample else None  # follows torch.manual_seed, as generate does
    results = decode(model, rows, max_new, head=draft_head, shape=tree_shape or DEFAULT_TREE, sampling=sampling,
                     eos_ids=eos, seed=seed, stream=stream)
    if streamer is not None:
        streamer.end()
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else min(eos, default=0)
    width = max(len(r.tokens) for r in results)
    new = torch.full((len(results), width), int(pad), dtype=input_ids.dtype, device=input_ids.device)
    for i, r in enumerate(results):
        new[i, : len(r.tokens)] = torch.tensor(r.tokens, dtype=input_ids.dtype)
    return torch.cat([input_ids, new], dim=1)
