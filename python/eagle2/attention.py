"""Tree attention for the target (through transformers' attention interface) and the draft.

The target runs its own transformers code for verification: we register an attention
function under the name "eagle2_tree" and select it with `config._attn_implementation` only
for the duration of our forwards (`target_forward`), so the model keeps its usual attention
(sdpa, ...) everywhere else, e.g. in `model.generate`. The tree mask and prefix lengths travel
as extra keyword arguments of the model call, which transformers forwards to the attention
function; the tree positions travel as position_ids. transformers builds no attention mask
for an implementation it does not know, so the call costs no mask materialisation.
A layer with a sliding window (Mistral, Qwen2, Gemma 2/3 ...: transformers hands the layer's
window to the attention function; Qwen2-MoE keeps it on the attention module) attends within
it, measured in positions, so such targets are exact at any length; the cache keeps every key.
Attention features tree_attention does not implement, and windows applied only through the
attention mask we never build, make `check_target` refuse the model.
"""
from __future__ import annotations

import inspect

import torch
from transformers import AttentionInterface

import eagle2_kernels


NAME = "eagle2_tree"


def tree_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_bits: torch.Tensor,
                prefix_len: torch.Tensor, scale: float, positions: torch.Tensor | None = None,
                sliding_window: int | None = None) -> torch.Tensor:
    """q [B, Hq, n, d], k/v [B, Hkv, S, d] (cache buffers after the update), mask_bits
    [B, n, W] int32 over the keys from prefix_len [B] on, positions [B, n] int32 (needed with a
    sliding window) -> [B, n, Hq, d]."""
    return eagle2_kernels.tree_attention(q.contiguous(), k, v, mask_bits, prefix_len, scale, positions=positions,
                                         sliding_window=sliding_window).transpose(1, 2)


def _hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: (attn_output [B, q_len, Hq, d], no weights). The layer's
    window: the sliding_window keyword when the layer passes one (None: a full layer), else the
    module's own attribute (Qwen2-MoE)."""
    if "eagle2_mask_bits" not in kwargs:
        raise RuntimeError(f"attention implementation {NAME!r} needs the eagle2_mask_bits / eagle2_prefix_len "
                           "keyword arguments; call the model through eagle2.attention.target_forward")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(module, "sliding_window", None)
    return tree_attend(query, key, value, kwargs["eagle2_mask_bits"], kwargs["eagle2_prefix_len"], scale,
                       kwargs["eagle2_positions"] if window else None, window), None


AttentionInterface.register(NAME, _hf_attention)


_CACHE_KWARG: dict[type, str] = {}


@torch.compiler.assume_constant_result  # a compiled step takes the answer, not a trace of inspect
def _cache_kwarg(model_cls: type) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); use what this version takes."""
    if model_cls not in _CACHE_KWARG:
        params = inspect.signature(model_cls.forward).parameters
        _CACHE_KWARG[model_cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARG[model_cls]


def target_forward(model, input_ids: torch.Tensor, position_ids: torch.Tensor, cache, mask_bits: torch.Tensor,
                   prefix_len: torch.Tensor) -> torch.Tensor:
    """One forward of a transformers causal LM over n new tokens per row with tree attention.

    input_ids, position_ids [B, n]; cache: a KVCache whose rows receive the n tokens at their
    current lengths; mask_bits [B, n, W] int32, visibility among the new tokens (the prefix,
    keys before prefix_len [B], is always visible). Returns the features [B, n, h] (the final
    normed hidden states; the caller applies the lm_head where it needs logits). The decode loop
    passes eagle2.linear.skinny_twin(model), whose linear layers run on skinny_linear on the CPU.
    """
    return _tree_forward(model, input_ids, position_ids, cache, mask_bits, prefix_len).last_hidden_state


def target_forward_layers(model, input_ids: torch.Tensor, position_ids: torch.Tensor, cache, mask_bits: torch.Tensor,
                          prefix_len: torch.Tensor, layers: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """target_forward that also returns the outputs of the decoder layers `layers` (indices
    0..L-2), concatenated [B, n, len(layers) h], from the same forward (what an EAGLE-3 head
    reads). transformers hands the per-layer states out by reference: no copies."""
    out = _tree_forward(model, input_ids, position_ids, cache, mask_bits, prefix_len, hidden_states=True)
    return out.last_hidden_state, torch.cat([out.hidden_states[i + 1] for i in layers], dim=-1)


def _tree_forward(model, input_ids, position_ids, cache, mask_bits, prefix_len, hidden_states: bool = False):
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    config = model.config
    saved = config._attn_implementation
    config._attn_implementation = NAME
    try:
        return base(input_ids=input_ids, position_ids=position_ids, use_cache=True, output_hidden_states=hidden_states,
                    eagle2_mask_bits=mask_bits, eagle2_prefix_len=prefix_len, eagle2_positions=position_ids.int().contiguous(),
                    **{_cache_kwarg(type(base)): cache})
    finally:
        config._attn_implementation = saved


def target_logits(model, features: torch.Tensor) -> torch.Tensor:
    """The target's lm_head over features [B, n, h] -> logits [B, n, V] (on skinny_linear on
    the CPU when model is a skinny_twin, like the rest of our forwards), soft-capped as the
    model's own forward does when its config says so (final_logit_softcapping, Gemma 2)."""
    logits = model.get_output_embeddings()(features)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def check_target(model) -> None:
    """Refuse (ValueError naming the feature) a target whose attention tree_attention cannot
    compute exactly: logit soft-capping, attention sinks, ALiBi, KV shared across layers,
    encoder-decoder models. Sliding windows are computed exactly (tree_attention's window)."""
    config = model.config
    problems = []
    if getattr(config, "is_encoder_decoder", False):
        problems.append("an encoder-decoder model (eagle2 decodes causal LMs)")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        problems.append(f"attention logit soft-capping (attn_logit_softcapping={config.attn_logit_softcapping})")
    if getattr(config, "alibi", False) or getattr(config, "position_embedding_type", None) == "alibi":
        problems.append("ALiBi position biases")
    if getattr(config, "num_kv_shared_layers", 0):
        problems.append(f"KV caches shared across layers (num_kv_shared_layers={config.num_kv_shared_layers})")
    if any(getattr(m, "sinks", None) is not None for m in model.modules()):
        problems.append("attention sinks")
    if sliding_window(config) is not None:
        masked = _windows_only_in_mask(model)
        if masked:
            problems.append(f"a sliding window applied only through the attention mask ({', '.join(masked)} "
                            "neither passes it to the attention function nor stores it)")
    if problems:
        raise ValueError(f"target {type(model).__name__}: {'; '.join(problems)} is not supported by eagle2's tree "
                         "attention (the output would not equal the model's own)")


def _windows_only_in_mask(model) -> list[str]:
    """The attention classes (modules with a layer_idx and q/k/v projections) whose windows only
    the model's mask carries: their forward never names sliding_window and none of their layers
    keeps one as an attribute (PhiMoE, Doge). A forward whose source cannot be read counts."""
    layers: dict[type, list] = {}
    for m in model.modules():
        if hasattr(m, "layer_idx") and any(hasattr(m, p) for p in ("q_proj", "qkv_proj", "k_proj")):
            layers.setdefault(type(m), []).append(m)
    masked = []
    for cls, modules in layers.items():
        try:
            named = "sliding_window" in inspect.getsource(cls.forward)
        except (OSError, TypeError):
            named = False
        if not named and not any(hasattr(m, "sliding_window") for m in modules):
            masked.append(cls.__name__)
    return sorted(masked)


def sliding_window(config) -> int | None:
    """The smallest attention window among the target's layers, or None (every layer sees all)."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    return int(window) if types is None or "sliding_attention" in types else None


def chain_bits(n: int, batch: int, device=None) -> torch.Tensor:
    """Causal mask bits [batch, n, ceil(n/32)] for n consecutive new tokens (token i sees 0..i)."""
    causal = torch.ones((n, n), dtype=torch.bool, device=device).tril()
    return eagle2_kernels.pack_mask_bits(causal).expand(batch, n, (n + 31) // 32).contiguous()
