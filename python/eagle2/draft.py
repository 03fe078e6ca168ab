"""The EAGLE-1/2 draft head.

    x_i  = fc(concat[emb(t_{i+1}), f_i])          f_i: the target's final-normed hidden state
    f'_i = layers(x_i)                             a Llama decoder layer without input norm
                                                   (then N - 1 ordinary pre-norm ones)
    draft logits = f'_i @ lm_head.weight.T         the target's lm_head (rows d2t if reduced)

f'_i predicts f_{i+1}. The head reuses the target's embedding and lm_head (`attach`); they
are neither stored nor saved. Position convention: the input pairing f_i with t_{i+1} sits at
position i + 1, the position of t_{i+1} (RoPE is relative, so this is equivalent to EAGLE's
own convention, which uses position i).

Checkpoint layout (the official EAGLE-1/2 one): a directory with config.json (Llama fields,
num_hidden_layers 1) and model.safetensors or pytorch_model.bin with exactly the keys
    fc.weight, fc.bias (when the config's "bias" is true; inferred from the file when the
    config has no "bias" field, as in official EAGLE configs),
    layers.0.self_attn.{q,k,v,o}_proj.weight (+ {q,k,v}_proj.bias with qkv_bias/attention_bias),
    layers.0.mlp.{gate,up,down}_proj.weight, layers.0.post_attention_layernorm.weight,
    d2t (optional, int64 [Vd]: draft index -> target token id; a reduced draft vocabulary).
num_hidden_layers N > 1 adds layers.1 .. layers.N-1, each with the keys of layers.0 plus
input_layernorm.weight (as the official EAGLE-1/2 code builds them; its released heads have N = 1).
Official EAGLE checkpoints also carry `embed_tokens.weight`, an untrained copy of the target's
embedding: it is accepted (its shape must be [vocab_size, hidden_size]) and dropped, since the
head always uses the target's own embedding. Any other key, or a missing one, is a ValueError
naming it. Our d2t stores absolute target ids (EAGLE-3 checkpoints store offsets instead).
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb,
)

from .attention import tree_attend
from .linear import linear
from .model import head_dim

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
IGNORED_KEYS = ("embed_tokens.weight",)
# Target config fields a head copies (Llama names; other families use the same ones).
CONFIG_FIELDS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "rms_norm_eps", "max_position_embeddings", "vocab_size", "hidden_act", "rope_theta", "rope_scaling",
)


class DraftAttention(nn.Module):
    """Self-attention of the draft layer: causal over a full sequence (training), unrolled
    over its own predictions (training-time test, `unroll`), or tree-masked over its own KV
    cache (drafting)."""

    def __init__(self, config: LlamaConfig, qkv_bias: bool, in_features: int | None = None, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        d_in = in_features or config.hidden_size  # EAGLE-3 reads [embedding; hidden], 2h wide
        self.q_proj = nn.Linear(d_in, self.heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_in, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_in, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache=None, mask_bits=None, prefix_len=None, unroll=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, Hq, T, d]
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, d]
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        earlier = unroll.kv.setdefault(self.layer_idx, []) if unroll is not None else None
        if cache is not None:
            k_all, v_all = cache.update(k, v, self.layer_idx)
            out = tree_attend(q, k_all, v_all, mask_bits, prefix_len, self.head_dim**-0.5)
        elif earlier:
            out = _unrolled_attention(q, k, v, earlier, unroll.index).transpose(1, 2)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.heads != self.kv_heads)
            out = out.transpose(1, 2)  # [B, T, Hq, d]
        if earlier is not None:
            earlier.append((k, v))
        return self.o_proj(out.reshape(B, T, -1))


@dataclass
class Unroll:
    """The training-time test's state, threaded through the head's calls (train.unrolled):
    each step's keys and values per attention layer, and `index` [B, P], the step-1 positions
    that steps 2.. carry on from (None: all of them)."""

    kv: dict[int, list] = field(default_factory=dict)
    index: torch.Tensor | None = None


def _unrolled_attention(q, k, v, earlier: list, index: torch.Tensor | None) -> torch.Tensor:
    """Attention of unroll step s = len(earlier) + 1 >= 2 of the training-time test, in one layer.

    Query p of step s continues step-1 position j = index[b, p]: it stands for the draft node
    at depth s below the root t_{j+1}, which at decode time sees the committed prefix (step 1's
    keys 0..j, the causal part) and its ancestors at depths 2..s-1 plus itself (query p of
    each later step: the diagonal). q [B, Hq, P, d], k / v [B, Hkv, P, d] of this step;
    earlier: this layer's (keys, values) of steps 1 .. s-1, step 1's [B, Hkv, T, d]; index as
    Unroll.index. Returns [B, Hq, P, d]."""
    group = q.shape[1] // k.shape[1]
    expand = lambda t: t.repeat_interleave(group, dim=1)  # noqa: E731  GQA: one KV head per group
    (k1, v1), rest = earlier[0], earlier[1:] + [(k, v)]
    B, _, P, _ = q.shape
    T, scale = k1.shape[2], q.shape[-1] ** -0.5
    index = index if index is not None else torch.arange(T, device=q.device).expand(B, T)
    hidden = torch.arange(T, device=q.device)[None, None] > index[:, :, None]  # [B, P, T]: key after the root
    causal = ((q @ expand(k1).transpose(-1, -2)) * scale).masked_fill(hidden[:, None], float("-inf"))
    ks, vs = torch.stack([expand(kk) for kk, _ in rest], 3), torch.stack([expand(vv) for _, vv in rest], 3)  # [B, Hq, P, S, d]
    diag = (q[:, :, :, None] * ks).sum(-1) * scale  # [B, Hq, P, S]
    scores = torch.cat([causal, diag], -1)
    w = torch.softmax(scores, -1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
    return w[..., :T] @ expand(v1) + (w[..., T:, None] * vs).sum(3)


class DraftLayer(nn.Module):
    """A Llama decoder layer; the first (layer_idx 0, EAGLE's only one) has no input norm."""

    def __init__(self, config: LlamaConfig, qkv_bias: bool, layer_idx: int = 0):
        super().__init__()
        self.self_attn = DraftAttention(config, qkv_bias, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        if layer_idx > 0:
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @torch.no_grad()
    def mute(self) -> None:
        """Zero the projections that write into the residual stream (o_proj, down_proj): the
        layer passes its input through until they are trained, while the others get gradients."""
        self.self_attn.o_proj.weight.zero_()
        self.mlp.down_proj.weight.zero_()

    def forward(self, x, cos, sin, cache=None, mask_bits=None, prefix_len=None, unroll=None):
        a = self.input_layernorm(x) if hasattr(self, "input_layernorm") else x
        h = x + self.self_attn(a, cos, sin, cache, mask_bits, prefix_len, unroll)
        return h + self.mlp(self.post_attention_layernorm(h))


class HeadBase(nn.Module):
    """What the EAGLE-1/2 and EAGLE-3 heads share: the d2t map to target ids, the size checks
    against a target, the tensors a checkpoint stores."""

    config: LlamaConfig
    d2t: torch.Tensor | None
    fc: nn.Linear

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the head computes in: its weights' (`load(draft_dtype=...)`), which may
        differ from the target's; its KV cache and its share of the lm_head follow it."""
        return self.fc.weight.dtype

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map draft vocabulary indices to target token ids (identity without d2t)."""
        return draft_ids if self.d2t is None else self.d2t[draft_ids.long()].to(draft_ids.dtype)

    def check_fits(self, target) -> tuple[int, int]:
        """The target's (vocabulary, hidden size); ValueError when the head's differ or d2t
        holds ids outside the vocabulary."""
        V, h = target.get_output_embeddings().weight.shape
        if self.config.hidden_size != h:
            raise ValueError(f"draft head: hidden_size {self.config.hidden_size} does not match the target's {h}")
        if self.config.vocab_size != V:
            raise ValueError(f"draft head: vocab_size {self.config.vocab_size} does not match the target's {V}")
        if self.d2t is not None and self.d2t.numel() and not (0 <= int(self.d2t.min()) and int(self.d2t.max()) < V):
            raise ValueError(f"draft head: d2t holds ids outside the target vocabulary [0, {V})")
        return V, h

    def cpu_state(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The state dict on the CPU, contiguous, floating tensors cast to dtype if given."""
        return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
                for k, v in self.state_dict().items()}


class DraftHead(HeadBase):
    """EAGLE-1/2 draft head. Build with `DraftHead(config)`, `DraftHead.for_target(model)` or
    `DraftHead.from_pretrained(path)`; call `attach(target)` before use."""

    # What the head reads from the target: None = its final-normed last hidden state (an
    # EAGLE-3 head names decoder layers instead, eagle2.draft3).
    target_layers = None

    def __init__(self, config: LlamaConfig, bias: bool = True, d2t: torch.Tensor | None = None):
        super().__init__()
        n = config.num_hidden_layers
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"draft head config: expected num_hidden_layers >= 1, got {n!r}")
        self.config = config
        self.bias = bias
        qkv_bias = bool(getattr(config, "qkv_bias", False) or getattr(config, "attention_bias", False))
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=bias)
        self.layers = nn.ModuleList([DraftLayer(config, qkv_bias, i) for i in range(n)])
        self.rotary_emb = LlamaRotaryEmbedding(config)  # non-persistent buffers: not in the state dict
        if d2t is not None:
            self.register_buffer("d2t", d2t.long())
        else:
            self.d2t = None
        self._target = None  # (embedding, draft lm_head weight [Vd, h]) from attach()

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def for_target(cls, target, init_from_last_layer: bool = True, bias: bool = True,
                   d2t: torch.Tensor | None = None, layers: int = 1) -> "DraftHead":
        """A head of `layers` decoder layers shaped for a transformers causal LM, attached to
        it. With init_from_last_layer each layer starts as a copy of the target's last decoder
        layer and fc passes the feature through (a sensible untrained start); else random init."""
        param = next(target.parameters())
        head = cls(config_for(target, layers), bias=bias, d2t=d2t).to(device=param.device, dtype=param.dtype)
        if init_from_last_layer:
            last = target.get_decoder().layers[-1].state_dict()
            for i, layer in enumerate(head.layers):
                layer.load_state_dict({k: v for k, v in last.items() if i or not k.startswith("input_layernorm")},
                                      strict=False)
            h = head.config.hidden_size
            with torch.no_grad():
                head.fc.weight.zero_()
                head.fc.weight[:, h:] = torch.eye(h)
                if head.fc.bias is not None:
                    head.fc.bias.zero_()
        return head.attach(target)

    def grown(self, layers: int) -> "DraftHead":
        """This head with decoder layers appended up to `layers` (attached like it), computing
        the same function: each new layer copies the last one's weights with its output
        projections (o_proj, down_proj) zeroed, so it adds nothing until trained."""
        n = self.config.num_hidden_layers
        if layers < n:
            raise ValueError(f"layers: expected at least the head's {n}, got {layers}")
        config = copy.deepcopy(self.config)
        config.num_hidden_layers = layers
        param = next(self.parameters())
        head = type(self)(config, bias=self.bias, d2t=self.d2t).to(device=param.device, dtype=param.dtype)
        head.load_state_dict(self.state_dict(), strict=False)
        for layer in head.layers[n:]:
            layer.load_state_dict(self.layers[-1].state_dict(), strict=False)
            layer.mute()
        head._target = self._target
        return head

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> "DraftHead":
        """Load a head saved in the EAGLE-1/2 layout (see the module docstring), strictly."""
        path = Path(path)
        raw = read_config(path)
        state = read_weights(path)
        bias = raw.get("bias", "fc.bias" in state)
        config = llama_config(raw, ("bias",))
        d2t = state.get("d2t")
        head = cls(config, bias=bool(bias), d2t=d2t).to(device=device, dtype=dtype)
        check_keys(head.state_dict(), state, config)
        head.load_state_dict({k: v for k, v in state.items() if k not in IGNORED_KEYS})
        return head

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write config.json + model.safetensors (EAGLE-1/2 layout; weights cast to dtype if given)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"architectures": ["LlamaForCausalLM"], "bias": self.bias,
                  **config_json(self.config, dtype or next(self.parameters()).dtype)}
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = self.cpu_state(dtype)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})

    def attach(self, target) -> "DraftHead":
        """Use the target's embedding and lm_head (refusing a head whose hidden size or
        vocabulary does not match). Call again after moving the target or the head."""
        self.check_fits(target)
        lm_w = target.get_output_embeddings().weight  # [V, h]
        if self.d2t is not None:
            lm_w = lm_w.index_select(0, self.d2t.to(lm_w.device))
        self._target = (target.get_input_embeddings(), lm_w.to(self.dtype))
        return self

    # ---- compute -----------------------------------------------------------------------
    def forward(self, features: torch.Tensor, next_tokens: torch.Tensor, position_ids: torch.Tensor,
                cache=None, mask_bits: torch.Tensor | None = None, prefix_len: torch.Tensor | None = None,
                unroll: list | None = None) -> torch.Tensor:
        """Predicted features [B, T, h].

        features [B, T, h] (f_i), next_tokens [B, T] (t_{i+1}), position_ids [B, T] (the
        position of t_{i+1}). Without a cache: causal attention over the T inputs (training).
        With a KVCache: the inputs are appended at each row's cache length and attend with
        tree_attention (mask_bits [B, T, W] over the keys from prefix_len [B] on).
        unroll (training-time test, no cache): an Unroll that collects each call's keys and
        values; a call with keys in it is the next unroll step (see train.unrolled).
        """
        emb = self._embedding()(next_tokens)
        x = self.fc(torch.cat([emb.to(self.dtype), features.to(self.dtype)], dim=-1))
        cos, sin = self.rotary_emb(x, position_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, mask_bits, prefix_len, unroll)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits [..., Vd] (Vd = len(d2t), else the target's vocabulary)."""
        return linear(hidden, self._lm_weight().to(hidden.dtype))

    def target_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The target's logits over the draft vocabulary from its final features: the head's
        own `logits`, since an EAGLE-1/2 head shares the target's lm_head (training targets)."""
        return self.logits(features)

    def _embedding(self):
        if self._target is None:
            raise RuntimeError("draft head: call attach(target) first (it reuses the target's embedding and lm_head)")
        return self._target[0]

    def _lm_weight(self):
        self._embedding()
        return self._target[1]


def config_for(target, layers: int = 1) -> LlamaConfig:
    """A Llama config of `layers` layers with the target's sizes, norms and rope settings."""
    src = target.config.to_dict()
    fields = {k: src[k] for k in CONFIG_FIELDS if src.get(k) is not None}
    fields.update(_legacy_rope(target.config))
    fields["head_dim"] = head_dim(target.config)
    return LlamaConfig(**fields, num_hidden_layers=layers, attention_bias=bool(getattr(target.config, "attention_bias", False)))


def config_json(config: LlamaConfig, dtype: torch.dtype) -> dict:
    """The Llama fields of a head's config.json (rope as every transformers version reads it)."""
    return {
        "model_type": "llama", "num_hidden_layers": config.num_hidden_layers,
        **{k: getattr(config, k) for k in CONFIG_FIELDS if k not in ("rope_theta", "rope_scaling")},
        **_legacy_rope(config),
        "attention_bias": bool(getattr(config, "attention_bias", False) or getattr(config, "qkv_bias", False)),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _legacy_rope(config) -> dict:
    """rope_theta / rope_scaling as written in Llama config.json files (readable by the
    official EAGLE code and by every transformers version)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.pop("rope_theta", None) or getattr(config, "rope_theta", None) or 10000.0
    scaling = params if params.get("rope_type", params.get("type", "default")) != "default" else None
    return {"rope_theta": theta, "rope_scaling": scaling}


def read_config(path: Path) -> dict:
    """A head folder's config.json as a dict (ValueError when missing or not a JSON object)."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"draft head: {cfg_file} not found")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"draft head: {cfg_file} is not readable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"draft head: {cfg_file} holds {type(raw).__name__}, expected a JSON object")
    return raw


def llama_config(raw: dict, extra: tuple[str, ...] = ()) -> LlamaConfig:
    """The LlamaConfig of a head's config.json, without the non-Llama fields `extra`."""
    skip = ("architectures", "torch_dtype", "dtype", *extra)
    config = LlamaConfig(**{k: v for k, v in raw.items() if k not in skip})
    config.head_dim = head_dim(config)
    return config


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a head folder's model.safetensors or pytorch_model.bin."""
    for name in WEIGHT_FILES:
        f = path / name
        if f.is_file():
            try:
                if name.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    return load_file(str(f))
                return torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # a truncated or foreign file: safetensors and pickle raise various types
                raise ValueError(f"draft head: {f} cannot be read ({type(e).__name__}: {e})") from None
    raise ValueError(f"draft head: no weights in {path} (expected one of {', '.join(WEIGHT_FILES)})")


def check_keys(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], config: LlamaConfig) -> None:
    """ValueError naming the first unexpected, missing or mis-shaped key of a checkpoint
    (IGNORED_KEYS may be present, with the shape of the target's embedding)."""
    for key in state:
        if key in IGNORED_KEYS:
            shape = (config.vocab_size, config.hidden_size)
            if tuple(state[key].shape) != shape:
                raise ValueError(f"draft head: {key} has shape {tuple(state[key].shape)}, expected {shape}")
        elif key not in expected:
            raise ValueError(f"draft head: unexpected key {key!r} in the checkpoint")
    for key, ref in expected.items():
        if key not in state:
            raise ValueError(f"draft head: missing key {key!r} in the checkpoint")
        if state[key].shape != ref.shape:
            raise ValueError(f"draft head: {key} has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}")
