"""Shared pieces of the decode-loop tests (test_draft, test_generate, test_loop_*): tiny
random Llama targets and draft heads (EAGLE-1/2 and EAGLE-3) in float64, where the loop's
output must match plain decoding exactly."""
from __future__ import annotations

import pytest
import torch
import transformers

from eagle2.draft import DraftHead
from eagle2.draft3 import Eagle3Head


def tiny_target(vocab: int = 160, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                context: int = 256, seed: int = 0, layer_scale: float = 1.0, logit_scale: float = 1.0,
                eos: int = 2, family: str = "Llama", **config_extra):
    """A random float64 causal LM of a transformers family (LlamaForCausalLM by default; any
    <family>Config / <family>ForCausalLM pair of the Llama kind). layer_scale < 1 shrinks what
    the layers add to the residual stream, so the next token depends mostly on the current one
    (a draft can guess it); logit_scale > 1 sharpens its next-token distributions (random init
    gives near-uniform ones). Families whose causal LM takes a text config (Gemma3) get it."""
    torch.manual_seed(seed)
    config_cls = getattr(transformers, f"{family}TextConfig", None) or getattr(transformers, f"{family}Config")
    config = config_cls(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=context,
        eos_token_id=eos, bos_token_id=1, pad_token_id=0, tie_word_embeddings=False, **config_extra)
    model = getattr(transformers, f"{family}ForCausalLM")(config).double().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(layer_scale)
            layer.mlp.down_proj.weight.mul_(layer_scale)
        model.lm_head.weight.mul_(logit_scale)
    return model


def random_head(target, seed: int = 1, layers: int = 1) -> DraftHead:
    torch.manual_seed(seed)
    head = DraftHead.for_target(target, init_from_last_layer=False, layers=layers)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.1)
    return head.double().attach(target)


def random_eagle3_head(target, seed: int = 1, layers: tuple[int, ...] | None = None,
                       d2t: torch.Tensor | None = None) -> Eagle3Head:
    """A random EAGLE-3 head; layers default to (0, 0, 0), which every target of >= 2 layers has."""
    torch.manual_seed(seed)
    head = Eagle3Head.for_target(target, d2t=d2t, layers=layers or (0, 0, 0), init_from_target=False)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.1)
    return head.double().attach(target)


def cheat_head(target, d2t: torch.Tensor | None = None) -> DraftHead:
    """A head that predicts the target's feature from the next token alone (fc = [I | 0], the
    layer a no-op): accurate for a tiny_target with a small layer_scale."""
    head = DraftHead.for_target(target, init_from_last_layer=False, d2t=d2t).double()
    h = target.config.hidden_size
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.weight[:, :h] = torch.eye(h)
        head.fc.bias.zero_()
        head.layers[0].self_attn.o_proj.weight.zero_()
        head.layers[0].mlp.down_proj.weight.zero_()
    return head.attach(target)


def assert_edited_checkpoint_refused(path, edit, message: str, load) -> None:
    """Apply edit(state) to the model.safetensors in `path`; load(path) must raise a ValueError
    matching `message`."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=message):
        load(path)


def ragged_prompts(count: int, vocab: int, seed: int, min_len: int = 1, max_len: int = 24) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (count,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]
