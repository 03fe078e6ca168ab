"""The user-facing API: `load` a target with its draft head into a `Generator`, and
`Generator.generate` prompts into `Result`s (re-exported by the eagle2 package)."""
from __future__ import annotations

import os
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .draft import DraftHead
from .draft3 import Eagle3Head, load_head
from .generate import RowResult, Sampling, decode, hf_generate
from .model import eos_ids
from .tree import TreeShape

DEFAULT_HEAD = Path(__file__).parent / "heads" / "smollm2-135m-instruct"
# The EAGLE-3 head trained for the same target: load(draft=EAGLE3_HEAD). Not the default: on
# the dev set it accepts more than the EAGLE-2 head (tau 2.36 against 2.23 at 60/6/10) but
# decodes no faster on the CPU at the tree `auto` picks (its model card).
EAGLE3_HEAD = Path(__file__).parent / "heads" / "smollm2-135m-instruct-eagle3"
# The shape used until `eagle2 tune` has measured this machine: a small, shallow tree. On a CPU
# a target forward over 60 tree tokens costs several single-token forwards, so the paper's
# 60/6/10 loses there. Measured on the 2-core dev CPU with head v4 (SmolLM2-135M, dev set,
# 2026-12-07, README "Measured numbers"): 5/1/4 is 1.28x / 1.27x plain decoding greedy at 2 / 1
# threads and 1.20x / 1.15x at temperature 1; the deeper 6/2/4 gains 2% greedy at 2 threads
# and loses 4-10% sampled.
DEFAULT_SHAPE = TreeShape(total_tokens=5, depth=1, branching=4)
METHODS = ("eagle2", "vanilla", "hf")


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

    def __init__(self, model, tokenizer=None, head: DraftHead | Eagle3Head | None = None, shape: TreeShape = DEFAULT_SHAPE,
                 eos_token_ids=None):
        from .attention import check_target

        check_target(model)
        self.model, self.tokenizer, self.head, self.shape = model, tokenizer, head, shape
        self._told_untuned = False
        if head is not None:
            head.attach(model)
        self.eos_ids = frozenset(eos_ids(model, tokenizer) if eos_token_ids is None else eos_token_ids)

    def encode(self, prompt: str | list[int], chat: bool = True) -> list[int]:
        """A str is one user turn in the chat template (chat=False: the plain text, with the
        tokenizer's usual special tokens); a list of ints is used as is."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("prompts: an empty prompt (nothing to answer)")
            if self.tokenizer is None:
                raise ValueError("prompts: text needs a tokenizer; pass token id lists instead")
            from .model import chat_prompt_ids

            return chat_prompt_ids(self.tokenizer, prompt) if chat else list(self.tokenizer(prompt).input_ids)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError(f"prompts: expected str or list of int token ids, got {type(prompt).__name__}")
        return list(prompt)

    def generate(self, prompts, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, method: str = "eagle2", total_tokens: int | str | None = None,
                 depth: int | None = None, branching: int | None = None, stream=None, stop: list[str] | None = None,
                 chat: bool = True, streamer=None, topk: int | None = None) -> list[Result]:
        """Decode a batch of prompts (str or token-id lists, or a single str).

        method: "eagle2" | "vanilla" | "hf". total_tokens / depth / branching override the tree
        shape (see `tree_shape`); top_k is the sampling top-k (0 = off), unrelated to the tree.
        seed makes sampling reproducible. stop: strings that end an output (kept in it, as
        transformers does). chat=False: text prompts without the chat template.
        stream(index, new_token_ids) is called as tokens are committed (eagle2 and vanilla);
        streamer: a transformers streamer (TextStreamer, TextIteratorStreamer: put/end) for a
        single prompt. topk is the deprecated name of branching. Returns one Result per prompt.
        """
        if method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
        if topk is not None:
            warnings.warn("generate(topk=...) is deprecated: the tree's children per node is now branching= "
                          "(top_k stays the sampling top-k)", DeprecationWarning, stacklevel=2)
            branching = topk if branching is None else branching
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ValueError(f"seed: expected an int in [0, 2**63) or None, got {seed!r}")
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = [self.encode(p, chat) for p in prompts]
        sampling = Sampling(temperature, top_p, top_k)
        stop_at = self._stop_strings(stop)
        if streamer is not None:
            if len(ids) != 1 or stream is not None:
                raise ValueError("streamer: expected a single prompt and no stream callback")
            stream = lambda row, new: streamer.put(torch.tensor([new]))  # noqa: E731
        if method == "hf":
            if stop_at is not None or stream is not None:
                raise ValueError("method 'hf': stop strings and streaming are for 'eagle2' and 'vanilla'")
            pad = getattr(self.tokenizer, "pad_token_id", None)
            rows = hf_generate(self.model, ids, max_new_tokens, sampling=sampling, eos_ids=self.eos_ids, pad_id=pad, seed=seed)
            return [self._result(r) for r in rows]
        head = shape = reduced = None
        if method == "eagle2":
            if self.head is None:
                raise ValueError("method 'eagle2' needs a draft head (load(..., draft=PATH)); use 'vanilla' without one")
            head, (shape, reduced) = self.head, self._shapes(temperature, total_tokens, depth, branching)
            vocab = len(head.d2t) if head.d2t is not None else head.config.vocab_size
            if shape.branching > vocab:
                raise ValueError(f"branching: expected at most {vocab} (the draft head's vocabulary), "
                                 f"got {shape.branching}")
        try:
            rows = decode(self.model, ids, max_new_tokens, head=head, shape=shape, reduced_shape=reduced,
                          sampling=sampling, eos_ids=self.eos_ids, seed=seed, stream=stream, stop_at=stop_at)
        finally:
            if streamer is not None:
                streamer.end()
        return [self._result(r) for r in rows]

    def stream_text(self, prompt, **kwargs) -> Iterator[str]:
        """generate() for one prompt, as an iterator of text pieces while tokens are committed
        (decoding runs in a background thread; the arguments are generate's)."""
        from transformers import TextIteratorStreamer

        if self.tokenizer is None:
            raise ValueError("stream_text needs a tokenizer")
        streamer = TextIteratorStreamer(self.tokenizer, skip_special_tokens=True)
        errors = []

        def run():
            try:
                self.generate(prompt, streamer=streamer, **kwargs)
            except BaseException as e:  # handed to the consumer below
                errors.append(e)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        yield from streamer
        worker.join()
        if errors:
            raise errors[0]

    def _stop_strings(self, stop):
        """stop_at(tokens) -> how many tokens to keep (through the first stop string), or None."""
        if stop is None:
            return None
        if isinstance(stop, str) or not all(isinstance(x, str) and x for x in stop):
            raise ValueError(f"stop: expected a list of non-empty strings, got {stop!r}")
        if self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer")
        decode = lambda t: self.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731

        def stop_at(tokens: list[int]) -> int | None:
            if not any(x in decode(tokens) for x in stop):
                return None
            return next(n for n in range(1, len(tokens) + 1) if any(x in decode(tokens[:n]) for x in stop))
        return stop_at

    def tree_shape(self, temperature: float = 0.0, total_tokens: int | str | None = None, depth: int | None = None,
                   branching: int | None = None) -> TreeShape:
        """The tree an eagle2 call uses: each given field over the Generator's shape.
        total_tokens m: nodes per tree, root included; depth: deepest draft level; branching:
        draft children per expanded node. A shape of "auto" is the one tuned for this machine
        (eagle2.autotune) once it has been measured (`eagle2 tune`), else DEFAULT_SHAPE;
        total_tokens="auto" measures now if needed (about a minute on a CPU, then cached).
        Given fields are always used as given, without tuning."""
        return self._shapes(temperature, total_tokens, depth, branching)[0]

    def _shapes(self, temperature: float, total_tokens, depth, branching) -> tuple[TreeShape, TreeShape | None]:
        """tree_shape's tree, and, when the whole tree is the tuned one, the tree for the steps
        that other processes leave at most half the cores to (autotune.reduced_shape; else None)."""
        given = {"total_tokens": total_tokens, "depth": depth, "branching": branching}
        TreeShape(**{k: 1 if v in (None, "auto") else v for k, v in given.items()})  # bad values fail before tuning
        base, reduced = self.shape, None
        if total_tokens == "auto" or (base == "auto" and None in given.values()):
            from .autotune import reduced_shape, tuned_shape

            measure = total_tokens == "auto"
            base = tuned_shape(self, temperature, measure=measure) or self._untuned_shape()
            if total_tokens in (None, "auto") and depth is None and branching is None:
                reduced = reduced_shape(self, temperature, measure=measure)
        return TreeShape(**{k: getattr(base, k) if v in (None, "auto") else v for k, v in given.items()}), reduced

    def _untuned_shape(self) -> TreeShape:
        if not self._told_untuned:
            self._told_untuned = True
            s = DEFAULT_SHAPE
            print(f"[eagle2] tree shape {s.total_tokens}/{s.depth}/{s.branching} (total_tokens/depth/branching), the "
                  "default: not tuned for this machine yet (`eagle2 tune` measures the best one, about a minute)",
                  file=sys.stderr, flush=True)
        return DEFAULT_SHAPE

    def _result(self, r: RowResult) -> Result:
        text = self.tokenizer.decode(r.tokens, skip_special_tokens=True) if self.tokenizer is not None else ""
        return Result(r.tokens, text, len(r.tokens), r.target_forwards, r.tau, r.seconds)


def check_device(device) -> torch.device:
    """A torch.device this library can run on: "cpu", or "cuda[:i]" with that GPU present."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r} ({e})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"device: {device!r} asked for, but torch sees no CUDA device (this torch: "
                             f"{torch.__version__}); use 'cpu'")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device: {device!r} asked for, but only {count} CUDA device(s) are visible")
    return dev


def check_dtype(dtype) -> torch.dtype:
    """torch.float32 / float16 / bfloat16 / float64, given as a torch.dtype or its name."""
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
    if isinstance(dtype, str):
        dtype = names.get(dtype.removeprefix("torch."), dtype)
    if dtype not in names.values():
        raise ValueError(f"dtype: expected one of {', '.join(names)} (or the torch dtype), got {dtype!r}")
    return dtype


def default_draft_dtype(target_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The draft head's dtype when load() is not told: bfloat16 for a float32 target on a CPU
    whose skinny_linear multiplies bfloat16 natively (AVX512-BF16: the head's weights, a share
    of the lm_head among them, are half the bytes and twice the multiply-adds per instruction;
    measured +3-5% tokens/s end to end on the 2-core dev CPU at the same acceptance), else the
    target's dtype."""
    import eagle2_kernels

    if target_dtype == torch.float32 and device.type == "cpu" and eagle2_kernels.skinny_linear_bf16_dot():
        return torch.bfloat16
    return target_dtype


def load(target=None, draft=None, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
         shape: TreeShape | str = "auto", tokenizer=None, draft_dtype: torch.dtype | str | None = None) -> Generator:
    """A Generator for a target and a draft head.

    target: a local HF checkpoint folder, an in-memory transformers causal LM (used as is:
    nothing is copied), or None for the embedded SmolLM2-135M-Instruct. tokenizer: the
    tokenizer of an in-memory target (a folder brings its own). draft: a head folder (EAGLE-1/2
    or EAGLE-3, told apart by its config.json), a DraftHead or an Eagle3Head; None = the head shipped for the default target, or no head for another
    target, which then supports only 'vanilla' and 'hf'.
    dtype: a torch dtype or its name (default float32; an in-memory target keeps its own);
    device: "cpu", "cuda" or "cuda:N" (default: the GPU when torch sees one, else the CPU).
    draft_dtype: the draft head's dtype (default: `default_draft_dtype` for a head read from a
    folder; an in-memory head keeps its own unless this is given, and is then converted in
    place). The draft only proposes tokens that the target then verifies, so its precision
    changes which tokens are proposed, never what is generated: greedy output stays plain
    greedy decoding's, sampling the target's distribution.
    shape: a TreeShape, or "auto" (default): the shape `eagle2 tune` measured best for this
    machine, model and head (eagle2.autotune; cached), DEFAULT_SHAPE until it has run.
    Raises ValueError for a bad argument and for a checkpoint folder that cannot be read."""
    from .model import load_target

    in_memory = isinstance(target, torch.nn.Module)
    if device is None:
        device = next(target.parameters()).device if in_memory else ("cuda" if torch.cuda.is_available() else "cpu")
    device = check_device(device)
    if shape != "auto" and not isinstance(shape, TreeShape):
        raise ValueError(f"shape: expected a TreeShape or 'auto', got {shape!r}")
    if in_memory:
        if not hasattr(target, "get_output_embeddings") or target.get_output_embeddings() is None:
            raise ValueError(f"target: expected a transformers causal LM, got {type(target).__name__}")
        model = target.to(device=device, dtype=check_dtype(dtype) if dtype is not None else None).eval()
    else:
        if target is not None and not isinstance(target, (str, os.PathLike)):
            raise ValueError(f"target: expected a folder, a transformers model or None, got {type(target).__name__}")
        if tokenizer is not None:
            raise ValueError("tokenizer: only for an in-memory target (a folder brings its own)")
        model, tokenizer = load_target(target, dtype=check_dtype(dtype or torch.float32), device=device)
    param = next(model.parameters())
    if draft is None and target is None:
        draft = DEFAULT_HEAD
    head_dtype = check_dtype(draft_dtype) if draft_dtype is not None else None
    if isinstance(draft, (DraftHead, Eagle3Head)):
        head = draft.to(device=param.device, dtype=head_dtype)
    elif draft is not None:
        head = load_head(draft, dtype=head_dtype or default_draft_dtype(param.dtype, param.device), device=param.device)
    else:
        head = None
    return Generator(model, tokenizer, head, shape)
