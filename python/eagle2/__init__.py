"""eagle2: EAGLE-2 speculative decoding (dynamic draft trees) for Hugging Face causal LMs.

    import eagle2
    gen = eagle2.load()                      # embedded default: SmolLM2-135M-Instruct + its head
    [r] = gen.generate(["Write a haiku about the sea."], max_new_tokens=64)
    print(r.text, r.tau)

`load(target, draft)` takes local folders (a HF checkpoint; an EAGLE-1/2 head, see
eagle2.draft). `Generator.generate` decodes a batch of prompts (ragged lengths are fine) with
method "eagle2" (speculative), "vanilla" (plain decoding in the same loop) or "hf"
(transformers' own generate). Greedy EAGLE-2 output equals plain greedy decoding; sampling
preserves the target's distribution (temperature, then top_k, then top_p).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .draft import DraftHead
from .generate import RowResult, Sampling, decode, hf_generate
from .tree import TreeShape

DEFAULT_HEAD = Path(__file__).parent / "heads" / "smollm2-135m-instruct"
# A small tree: on a CPU a target forward over 60 tree tokens costs several single-token
# forwards (DESIGN.md), so the paper's 60/6/10 loses there. Measured on the 2-core dev CPU with
# SmolLM2-135M (1 thread): verifying 6 tokens costs 1.6 plain forwards, 10 tokens 2.2, so 6/3/2
# beat 8/3/3 and 10/4/4 for an early trained head. Override per call.
DEFAULT_SHAPE = TreeShape(total_tokens=6, depth=3, topk=2)
METHODS = ("eagle2", "vanilla", "hf")

__all__ = ["DEFAULT_SHAPE", "DraftHead", "Generator", "Result", "Sampling", "TreeShape", "load"]


@dataclass
class Result:
    """One prompt's output.

    tokens           generated token ids (EOS included when it ended the output)
    text             their decoded text (special tokens skipped; "" without a tokenizer)
    new_tokens       len(tokens)
    target_forwards  target model forwards this prompt took part in, prefill included
    tau              mean tokens committed per target forward after the prefill (1.0 for
                     vanilla and hf)
    seconds          wall time from the start of the call until this prompt finished
    """

    tokens: list[int]
    text: str
    new_tokens: int
    target_forwards: int
    tau: float
    seconds: float


class Generator:
    """A target model with its tokenizer and (optional) draft head."""

    def __init__(self, model, tokenizer=None, head: DraftHead | None = None, shape: TreeShape = DEFAULT_SHAPE,
                 eos_token_ids=None):
        self.model, self.tokenizer, self.head, self.shape = model, tokenizer, head, shape
        if head is not None:
            head.attach(model)
        self.eos_ids = frozenset(_eos_ids(model, tokenizer) if eos_token_ids is None else eos_token_ids)

    def encode(self, prompt: str | list[int]) -> list[int]:
        """A str is one user turn in the chat template; a list of ints is used as is."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompts: text needs a tokenizer; pass token id lists instead")
            from .model import chat_prompt_ids

            return chat_prompt_ids(self.tokenizer, prompt)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError(f"prompts: expected str or list of int token ids, got {type(prompt).__name__}")
        return list(prompt)

    def generate(self, prompts, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, method: str = "eagle2", total_tokens: int | None = None,
                 depth: int | None = None, topk: int | None = None, stream=None) -> list[Result]:
        """Decode a batch of prompts (str or token-id lists, or a single str).

        method: "eagle2" | "vanilla" | "hf". total_tokens / depth / topk override the tree
        shape (m nodes per tree including the root, deepest draft level, children per node);
        total_tokens "auto" (or a Generator built with shape="auto") picks all three from
        measured costs (eagle2.autotune). seed makes sampling reproducible.
        stream(index, new_token_ids) is called as tokens are committed (eagle2 and vanilla).
        Returns one Result per prompt, in order.
        """
        if method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = [self.encode(p) for p in prompts]
        sampling = Sampling(temperature, top_p, top_k)
        shape = None if self.shape == "auto" else self.shape
        if method == "eagle2" and self.head is not None:
            names, given = ("total_tokens", "depth", "topk"), (total_tokens, depth, topk)
            TreeShape(*(1 if v in (None, "auto") else v for v in given))  # bad values fail before any tuning
            if total_tokens == "auto" or (shape is None and None in given):
                from .autotune import tuned_shape  # measured once per machine/model/head, then cached

                shape = tuned_shape(self, temperature)
                total_tokens = None if total_tokens == "auto" else total_tokens
            shape = TreeShape(*(getattr(shape, name) if v is None else v for v, name in
                                zip((total_tokens, depth, topk), names)))
        if method == "hf":
            pad = getattr(self.tokenizer, "pad_token_id", None)
            pad = pad if pad is not None else min(self.eos_ids, default=0)
            rows = hf_generate(self.model, ids, max_new_tokens, sampling=sampling, eos_ids=self.eos_ids, pad_id=pad, seed=seed)
        else:
            head = None
            if method == "eagle2":
                if self.head is None:
                    raise ValueError("method 'eagle2' needs a draft head (load(..., draft=PATH)); use 'vanilla' without one")
                head = self.head
            rows = decode(self.model, ids, max_new_tokens, head=head, shape=shape, sampling=sampling,
                          eos_ids=self.eos_ids, seed=seed, stream=stream)
        return [self._result(r) for r in rows]

    def _result(self, r: RowResult) -> Result:
        text = self.tokenizer.decode(r.tokens, skip_special_tokens=True) if self.tokenizer is not None else ""
        return Result(r.tokens, text, len(r.tokens), r.target_forwards, r.tau, r.seconds)


def load(target: str | None = None, draft: str | None = None, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu", shape: TreeShape | str = "auto") -> Generator:
    """Load a target (a local HF checkpoint folder; None = the embedded SmolLM2-135M-Instruct)
    and a draft head (an EAGLE-1/2 folder; None = the head shipped for the default target, or
    no head for another target, which then supports only 'vanilla' and 'hf').

    shape: the tree shape, or "auto" (default): chosen from the target's and the draft's costs
    measured on this machine on first use (eagle2.autotune; about a minute on a CPU, then
    cached), which beat every fixed shape in bench/results/sweep.json."""
    from .model import load_target

    model, tokenizer = load_target(target, dtype=dtype, device=device)
    if draft is None and target is None:
        draft = DEFAULT_HEAD
    head = DraftHead.from_pretrained(draft, dtype=dtype, device=device) if draft is not None else None
    return Generator(model, tokenizer, head, shape)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update([value] if isinstance(value, int) else value or [])
    return ids
