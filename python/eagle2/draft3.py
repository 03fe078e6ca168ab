"""The EAGLE-3 draft head, and `load_head`, which opens a head folder of either kind.

    g_i  = fc(concat[a_i, b_i, c_i])          three target layers' outputs at token i (3h -> h)
    x_i  = concat[norm(emb(t_{i+1})), norm(g_i)]                          2h wide
    g'_i = g_i + attn(x_i);  g'_i += mlp(norm(g'_i))                     one decoder layer
    draft logits = lm_head(norm(g'_i))        its own lm_head over the draft vocabulary

Deeper draft levels feed the head's own g' (h wide, no fc) back in place of g, as the
official implementation does; the decode loop, tree growth and acceptance are the same as
for an EAGLE-1/2 head (same interface: forward, logits, to_target_ids, attach). The head
reuses the target's embedding (not stored).

Checkpoint layout (the official EAGLE-3 one, as SafeAILab/EAGLE, SGLang and vLLM read it): a
directory with config.json (Llama fields, num_hidden_layers 1, `draft_vocab_size`,
architectures ["LlamaForCausalLMEagle3"]) and model.safetensors or pytorch_model.bin with
exactly the keys
    fc.weight [h, 3h], norm.weight, lm_head.weight [draft_vocab_size, h],
    midlayer.hidden_norm.weight, midlayer.input_layernorm.weight,
    midlayer.post_attention_layernorm.weight, midlayer.self_attn.{q,k,v}_proj.weight [*, 2h],
    midlayer.self_attn.o_proj.weight, midlayer.mlp.{gate,up,down}_proj.weight,
    d2t (int64 [draft_vocab_size]: target id - draft id), t2d (bool [vocab_size]: in the draft
    vocabulary); both may be absent when draft_vocab_size == vocab_size,
plus an optional `embed_tokens.weight` (accepted, shape-checked, dropped). Which target layers
feed it, in the two spellings engines read (they differ by one): `eagle_config.
eagle_aux_hidden_state_layer_ids` (SGLang) names decoder layers whose *outputs* are taken;
the top-level `eagle_aux_hidden_state_layer_ids` (vLLM) names layers whose *inputs* are taken.
Both are written; the nested one wins when reading. Without either: the official choice, the
inputs of layers 2, L/2 and L-3 of an L-layer target (outputs 1, L/2-1, L-4), on which all
engines agree. Variants eagle2 does not run (`norm_before_residual`, no `fc`, the speculators
format, a draft narrower than its target) are refused by name. In memory `d2t` holds absolute
target ids, as an EAGLE-1/2 head's does (None for an identity map).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from .draft import (
    DraftAttention, DraftHead, HeadBase, check_keys, config_for, config_json, llama_config, read_config, read_weights,
)
from .linear import linear

ARCHITECTURE = "LlamaForCausalLMEagle3"
_CONFIG_ONLY = ("draft_vocab_size", "eagle_config", "eagle_aux_hidden_state_layer_ids", "target_hidden_size",
                "tie_word_embeddings", "norm_before_residual")


def default_layers(num_layers: int) -> tuple[int, int, int]:
    """The official EAGLE-3 feature layers (as layer outputs) of an L-layer target, kept within
    0..L-2 (and in order) for targets of fewer than 5 layers."""
    return tuple(sorted(min(max(i, 0), num_layers - 2) for i in (1, num_layers // 2 - 1, num_layers - 4)))


class Eagle3Layer(nn.Module):
    """EAGLE-3's decoder layer: attention over [norm(embedding); norm(hidden)], the residual
    stream carrying the hidden state."""

    def __init__(self, config: LlamaConfig, qkv_bias: bool):
        super().__init__()
        h = config.hidden_size
        self.self_attn = DraftAttention(config, qkv_bias, in_features=2 * h)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
        self.hidden_norm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(h, eps=config.rms_norm_eps)

    def forward(self, emb, hidden, cos, sin, cache=None, mask_bits=None, prefix_len=None, unroll=None):
        x = torch.cat([self.input_layernorm(emb), self.hidden_norm(hidden)], dim=-1)
        h = hidden + self.self_attn(x, cos, sin, cache, mask_bits, prefix_len, unroll)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Head(HeadBase):
    """EAGLE-3 draft head. Build with `Eagle3Head.for_target(model)` or
    `Eagle3Head.from_pretrained(path)`; call `attach(target)` before use (it also settles the
    default feature layers)."""

    def __init__(self, config: LlamaConfig, layers: tuple[int, ...] | None = None, d2t: torch.Tensor | None = None,
                 n_layers: int = 3):
        super().__init__()
        if config.num_hidden_layers != 1:
            raise ValueError(f"draft head config: expected num_hidden_layers 1, got {config.num_hidden_layers}")
        h = config.hidden_size
        self.config = config
        self.layer_ids = tuple(layers) if layers is not None else None  # None: default_layers of the target
        n_layers = len(self.layer_ids) if self.layer_ids else n_layers
        if n_layers < 2:
            raise ValueError("draft head: an EAGLE-3 head reads at least 2 target layers (official: 3)")
        qkv_bias = bool(getattr(config, "qkv_bias", False) or getattr(config, "attention_bias", False))
        self.fc = nn.Linear(n_layers * h, h, bias=False)
        self.midlayer = Eagle3Layer(config, qkv_bias)
        self.norm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(h, len(d2t) if d2t is not None else config.vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        if d2t is not None:
            self.register_buffer("d2t", d2t.long())
        else:
            self.d2t = None
        self.target_layers: tuple[int, ...] | None = self.layer_ids  # settled by attach()
        self._target = None  # (the target's embedding, its lm_head) from attach(): a tuple keeps them out of the state dict

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def for_target(cls, target, d2t: torch.Tensor | None = None, layers: tuple[int, ...] | None = None,
                   init_from_target: bool = True) -> "Eagle3Head":
        """A head shaped for a transformers causal LM (feature layers: `layers`, else the
        official default), attached to it; its attention has no biases, as the official head.
        init_from_target starts it as a logit lens on the highest feature layer: fc picks that
        layer, the attention and MLP add nothing yet (o_proj, down_proj zero; q/k/v, gate/up
        from the target's last layer where it has them unfused), norm and lm_head are the
        target's (its d2t rows); else random init."""
        param = next(target.parameters())
        n = target.config.num_hidden_layers
        layers = tuple(layers) if layers is not None else default_layers(n)
        config = config_for(target)
        config.attention_bias = False
        head = cls(config, layers, d2t).to(device=param.device, dtype=param.dtype)
        if init_from_target:
            h = head.config.hidden_size
            last = target.get_decoder().layers[-1]
            attn = head.midlayer.self_attn
            with torch.no_grad():
                head.fc.weight.zero_()
                head.fc.weight[:, -h:] = torch.eye(h)
                for name in ("q_proj", "k_proj", "v_proj"):
                    w = getattr(attn, name).weight
                    w.zero_()
                    if hasattr(last.self_attn, name):  # Phi3 fuses them (qkv_proj): left at zero
                        w[:, h:] = getattr(last.self_attn, name).weight
                attn.o_proj.weight.zero_()
                head.midlayer.mlp.load_state_dict(last.mlp.state_dict(), strict=False)  # Phi3: gate_up_proj
                head.midlayer.mlp.down_proj.weight.zero_()
                head.norm.weight.copy_(target.get_decoder().norm.weight)
                lm = target.get_output_embeddings().weight
                head.lm_head.weight.copy_(lm if d2t is None else lm[d2t.to(lm.device)])
        return head.attach(target)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> "Eagle3Head":
        """Load a head saved in the official EAGLE-3 layout (see the module docstring), strictly."""
        path = Path(path)
        raw = read_config(path)
        _refuse_variants(raw)
        state = read_weights(path)
        config = llama_config(raw, _CONFIG_ONLY)
        V, Vd = config.vocab_size, int(raw.get("draft_vocab_size") or config.vocab_size)
        target_h = raw.get("target_hidden_size")
        if target_h is not None and target_h != config.hidden_size:
            raise ValueError(f"draft head: target_hidden_size {target_h} differs from hidden_size {config.hidden_size}; "
                             "eagle2 runs EAGLE-3 heads as wide as their target only")
        layers = _layer_ids(raw)
        d2t = _absolute_d2t(state, V, Vd)
        fc = state.get("fc.weight")
        n_layers = fc.shape[1] // config.hidden_size if fc is not None and fc.ndim == 2 else 3
        head = cls(config, layers, d2t, n_layers=n_layers).to(device=device, dtype=dtype)
        expected = {k: v for k, v in head.state_dict().items() if k != "d2t"}
        check_keys(expected, {k: v for k, v in state.items() if k not in ("d2t", "t2d")}, config)
        head.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)  # d2t: already set
        return head

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write config.json + model.safetensors in the official EAGLE-3 layout (weights cast to
        dtype if given; d2t stored as offsets, t2d beside it)."""
        import json

        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        c = self.config
        config = {"architectures": [ARCHITECTURE], **config_json(c, dtype or next(self.parameters()).dtype),
                  "draft_vocab_size": self.lm_head.out_features, "tie_word_embeddings": False}
        if self.target_layers is not None:  # SGLang's (layer outputs) and vLLM's (layer inputs) spelling
            config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(self.target_layers)}
            config["eagle_aux_hidden_state_layer_ids"] = [i + 1 for i in self.target_layers]
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = self.cpu_state(dtype)
        if self.d2t is not None:
            d2t = state.pop("d2t")
            state["d2t"] = d2t - torch.arange(len(d2t))
            state["t2d"] = torch.zeros(c.vocab_size, dtype=torch.bool).index_fill_(0, d2t, True)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})

    def attach(self, target) -> "Eagle3Head":
        """Use the target's embedding and settle the feature layers (refusing a head whose
        sizes do not match the target, or layers it does not have)."""
        _, h = self.check_fits(target)
        n = target.config.num_hidden_layers
        layers = self.layer_ids if self.layer_ids is not None else default_layers(n)
        if len(layers) * h != self.fc.in_features or not all(0 <= i <= n - 2 for i in layers):
            raise ValueError(f"draft head: feature layers {list(layers)} do not fit the target: expected "
                             f"{self.fc.in_features // h} layer outputs in [0, {n - 2}] (its {n} decoder layers, "
                             "the last one excluded)")
        self.target_layers = tuple(layers)
        self._target = (target.get_input_embeddings(), target.get_output_embeddings())
        return self

    # ---- compute -----------------------------------------------------------------------
    def forward(self, features: torch.Tensor, next_tokens: torch.Tensor, position_ids: torch.Tensor,
                cache=None, mask_bits: torch.Tensor | None = None, prefix_len: torch.Tensor | None = None,
                unroll=None) -> torch.Tensor:
        """The head's hidden states [B, T, h] (the input of `logits`, and of the next draft level).

        features [B, T, 3h] (the target layers' outputs at token i) or [B, T, h] (the head's own
        hidden state, deeper levels); next_tokens [B, T] (t_{i+1}); position_ids [B, T]; cache,
        mask_bits, prefix_len, unroll as DraftHead.forward."""
        if self._target is None:
            raise RuntimeError("draft head: call attach(target) first (it reuses the target's embedding)")
        dtype = self.dtype
        emb = self._target[0](next_tokens).to(dtype)
        hidden = features.to(dtype)
        if hidden.shape[-1] == self.fc.in_features:
            hidden = self.fc(hidden)
        cos, sin = self.rotary_emb(hidden, position_ids)
        return self.midlayer(emb, hidden, cos, sin, cache, mask_bits, prefix_len, unroll)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits [..., Vd] over the draft vocabulary."""
        return linear(self.norm(hidden), self.lm_head.weight.to(hidden.dtype))

    def target_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The target's own logits over the draft vocabulary [..., Vd] from its final features
        (the training targets; DraftHead.target_logits is the same for an EAGLE-1/2 head)."""
        w = self._target[1].weight
        return F.linear(features, (w if self.d2t is None else w.index_select(0, self.d2t)).to(features.dtype))


def _absolute_d2t(state: dict[str, torch.Tensor], V: int, Vd: int) -> torch.Tensor | None:
    """The absolute d2t of an official checkpoint's offsets, checked against its t2d."""
    if "d2t" not in state and "t2d" not in state and Vd == V:
        return None
    for key, shape in (("d2t", (Vd,)), ("t2d", (V,))):
        if key not in state:
            raise ValueError(f"draft head: missing key {key!r} in the checkpoint (draft_vocab_size {Vd} < vocab_size {V})")
        if tuple(state[key].shape) != shape:
            raise ValueError(f"draft head: {key} has shape {tuple(state[key].shape)}, expected {shape}")
    d2t = state["d2t"].long() + torch.arange(Vd)
    if Vd and not (0 <= int(d2t.min()) and int(d2t.max()) < V):
        raise ValueError(f"draft head: d2t maps draft ids outside the target vocabulary [0, {V})")
    t2d = state["t2d"].bool()
    if int(t2d.sum()) != Vd or not bool(t2d[d2t].all()):
        raise ValueError("draft head: t2d does not mark exactly the target ids that d2t maps to")
    return None if Vd == V and torch.equal(d2t, torch.arange(V)) else d2t


def _layer_ids(raw: dict) -> tuple[int, ...] | None:
    """The feature layers of a config.json as layer outputs: SGLang's nested ids as they are,
    else vLLM's top-level ids (layer inputs) minus one, else None (the default)."""
    nested = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if nested:
        return tuple(nested)
    top = raw.get("eagle_aux_hidden_state_layer_ids")
    if top:
        if min(top) < 1:
            raise ValueError(f"draft head: eagle_aux_hidden_state_layer_ids {top} names layer inputs (vLLM's "
                             "reading); 0, the embeddings, is not a feature eagle2 can take")
        return tuple(i - 1 for i in top)
    return None


def _refuse_variants(raw: dict) -> None:
    """ValueError for EAGLE-3 config variants eagle2 does not run, naming the field."""
    if "transformer_layer_config" in raw or "speculators_model_type" in raw:
        raise ValueError("draft head: a `speculators`-format EAGLE-3 config; eagle2 reads the official "
                         "(SafeAILab/EAGLE) layout: convert it first")
    if raw.get("norm_before_residual"):
        raise ValueError("draft head: norm_before_residual: true (residual after hidden_norm) is an EAGLE-3 "
                         "variant eagle2 does not implement")
    if (raw.get("eagle_config") or {}).get("use_aux_hidden_state") is False:
        raise ValueError("draft head: eagle_config.use_aux_hidden_state: false (no fc over target layers) is not "
                         "an EAGLE-3 head eagle2 runs")


def is_eagle3(raw: dict) -> bool:
    """Whether a head's config.json describes an EAGLE-3 head."""
    return any("eagle3" in str(a).lower() for a in raw.get("architectures") or []) \
        or "draft_vocab_size" in raw or "transformer_layer_config" in raw


def load_head(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> DraftHead | Eagle3Head:
    """The head in a folder, EAGLE-1/2 or EAGLE-3 as its config.json says."""
    kind = Eagle3Head if is_eagle3(read_config(Path(path))) else DraftHead
    return kind.from_pretrained(path, dtype=dtype, device=device)
