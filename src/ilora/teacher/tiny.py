"""Tiny offline LLMs and tokenizers for tests and smoke runs, plus loading real ones.

* `build_tiny_tokenizer`: a BPE tokenizer trained in-process (``tokenizers`` library) on
  the given texts (item titles and template words). ``style="llama"`` is
  SentencePiece-like: Metaspace ``"▁"`` pre-tokenizer (a ``"▁"`` is prepended to every
  text), byte fallback (``<0xNN>`` tokens, so any unicode text encodes without
  ``<unk>``), and ``<s>`` is added in front when ``add_special_tokens=True``.
  ``style="qwen2"`` is GPT-2/Qwen-like: byte-level BPE, no bos is added.
* `build_tiny_llm`: a randomly initialised (seeded) Llama or Qwen2 causal LM from a
  config, sized for CPU tests.
* `add_placeholder_tokens`: adds ``[HistoryEmb]``, ``[CansEmb]`` and ``[PH]`` as
  additional special tokens and grows the model's embeddings when needed.
* `load_llm`: any local or cached ``AutoModelForCausalLM`` + ``AutoTokenizer``.
"""

from __future__ import annotations

import inspect
import os
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ilora.errors import ConfigError, IloraError
from ilora.progress import library_bars_as_lines

HISTORY_TOKEN = "[HistoryEmb]"
CANDIDATE_TOKEN = "[CansEmb]"
TEXT_TOKEN = "[PH]"
PLACEHOLDER_TOKENS = (HISTORY_TOKEN, CANDIDATE_TOKEN, TEXT_TOKEN)

TOKENIZER_STYLES = ("llama", "qwen2")
ARCHS = ("llama", "qwen2")


@dataclass(frozen=True)
class PlaceholderIds:
    """Token ids of the placeholders: history item, candidate item, text-only marker."""

    history: int
    candidate: int
    text: int


def _special_tokens(style: str) -> dict[str, str]:
    if style == "llama":
        return {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    return {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>", "unk_token": "<|unk|>"}


def build_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 512, *, style: str = "llama"):
    """Train a small BPE tokenizer on ``texts``; returns a ``PreTrainedTokenizerFast``.

    ``vocab_size`` bounds the learned vocabulary; the 256 byte-fallback tokens of the
    llama style come on top of it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style not in TOKENIZER_STYLES:
        raise ConfigError(f"tokenizer style {style!r}: expected one of {', '.join(TOKENIZER_STYLES)}")
    special = _special_tokens(style)
    specials = list(dict.fromkeys(special.values()))
    if style == "llama":
        tok = Tokenizer(models.BPE(unk_token=special["unk_token"], byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    tok.train_from_iterator(list(texts), trainer)
    if style == "llama":
        tok = _with_byte_tokens(tok)
        bos = special["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def _with_byte_tokens(tok):
    """Append the 256 ``<0xNN>`` byte tokens to a trained BPE vocabulary (byte fallback)."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return Tokenizer.from_str(json.dumps(spec))


def build_tiny_llm(
    tokenizer,
    *,
    arch: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_positions: int = 2048,
    seed: int = 0,
):
    """A randomly initialised causal LM (``AutoModelForCausalLM``) matching ``tokenizer``.

    Weights depend only on ``seed`` and the sizes (the global RNG is left untouched).
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if arch not in ARCHS:
        raise ConfigError(f"arch {arch!r}: expected one of {', '.join(ARCHS)}")
    if hidden % heads:
        raise ConfigError(f"hidden size {hidden} is not a multiple of heads {heads}")
    config_cls = LlamaConfig if arch == "llama" else Qwen2Config
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        # HF's init (std 0.02) bounds a logit by about 0.02 * hidden, so a frozen random
        # head could never become confident and the LoRA experts could not fit anything.
        # A head of std 1/sqrt(hidden) gives logits of order 1, like a trained LM's.
        torch.nn.init.normal_(model.get_output_embeddings().weight, std=hidden**-0.5)
    return model.eval()


def add_placeholder_tokens(tokenizer, model=None) -> PlaceholderIds:
    """Add ``[HistoryEmb]``, ``[CansEmb]``, ``[PH]`` as special tokens; return their ids.

    Tokens already present are kept (idempotent). The model's input/output embeddings
    grow to ``len(tokenizer)`` only when they are smaller (Qwen checkpoints already
    carry spare rows).
    """
    if model is not None:
        check_vocab_covers_tokenizer(model, tokenizer)
    missing = [t for t in PLACEHOLDER_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        _add_extra_special_tokens(tokenizer, missing)
    if model is not None and model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(list(PLACEHOLDER_TOKENS))
    for token, i in zip(PLACEHOLDER_TOKENS, ids, strict=True):
        if i is None or i == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(i) != token:
            raise IloraError(f"placeholder token {token} did not get its own id in the tokenizer")
    return PlaceholderIds(*ids)


def check_vocab_covers_tokenizer(model, tokenizer) -> None:
    """`IloraError` unless the model's input embeddings and output layer have a row for every
    token of ``tokenizer`` but the placeholders (which the teacher adds and saves): a token
    beyond the model's vocabulary would get an untrained row, drawn anew at each load."""
    largest = max((i for token, i in tokenizer.get_vocab().items() if token not in PLACEHOLDER_TOKENS), default=-1)
    for what, layer in (("input embeddings", model.get_input_embeddings()), ("output layer", model.get_output_embeddings())):
        rows = layer.weight.shape[0] if layer is not None else None
        if rows is not None and rows <= largest:
            name = getattr(model.config, "_name_or_path", "") or type(model).__name__
            raise IloraError(
                f"the base LLM {name!r} has {rows} rows in its {what}, but its tokenizer has token ids up to {largest} "
                f"({len(tokenizer)} tokens): the tokens beyond the model's vocabulary have no trained embedding. Use the "
                "tokenizer the model was trained with (or a model whose vocabulary covers this tokenizer)"
            )


def _add_extra_special_tokens(tokenizer, tokens: list[str]) -> None:
    """Add special tokens without un-flagging existing ones (transformers 5 and 4 spellings)."""
    params = inspect.signature(tokenizer.add_special_tokens).parameters
    if "replace_extra_special_tokens" in params:  # transformers >= 5
        tokenizer.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)
    else:
        tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_additional_special_tokens=False)


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def require_eos(tokenizer, name: str | None = None) -> int:
    """The tokenizer's eos id; `IloraError` naming it (``name``, else its own path) if it has none."""
    eos = tokenizer.eos_token_id
    if eos is None:
        name = name or getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise IloraError(f"{name}: the tokenizer has no eos token; the answer needs one to end (give it one: eos_token in tokenizer_config.json)")
    return eos


def load_llm(
    name_or_path: str | Path, *, device: str | torch.device, dtype: torch.dtype | None = None, trust_remote_code: bool = False,
    check_tokenizer: Callable[[Any], None] | None = None,
):
    """Load ``(model, tokenizer)`` from a local directory or the local Hugging Face cache.

    ``check_tokenizer(tokenizer)`` runs before the weights load (as does the eos check), so a
    tokenizer the caller refuses costs no model load.

    A hub id is fetched by transformers as usual (set ``HF_HUB_OFFLINE=1`` to use only the
    local cache); a path or id that cannot be loaded raises `IloraError`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(name_or_path)
    local = Path(source).expanduser()
    if local.exists() and not local.is_dir():
        raise IloraError(f"{source}: an LLM must be a directory with config.json, not a file")
    if not local.exists() and (local.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1):
        raise IloraError(f"{source}: no such directory (an LLM is a model directory with config.json, or a hub id such as org/name)")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": offline}
    target = torch.device(device)
    if target.type == "cuda":  # weights straight onto the GPU: no full host copy per process (torchrun)
        index = torch.cuda.current_device() if target.index is None else target.index
        placement = {"device_map": {"": f"cuda:{index}"}}
    else:
        placement = {}
    where = str(local) if local.is_dir() else source
    nothing_here = "" if local.exists() else f" (nothing named {source!r} in the working directory {Path.cwd()})"
    unreachable = f"not a model directory{nothing_here}, and not a hub id that can be fetched or found in the local cache"
    if local.is_dir() and not (local / "config.json").is_file():
        raise IloraError(f"{local}: not a model directory: no config.json (save_pretrained writes it)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as err:
        if local.is_dir():
            raise IloraError(
                f"{local}: cannot load its tokenizer ({' '.join(str(err).split())}); a model directory needs the tokenizer files the model's "
                "tokenizer.save_pretrained writes (e.g. tokenizer.json or tokenizer.model)"
            ) from err
        raise IloraError(f"cannot load LLM {source!r}: {unreachable} ({err})") from err
    require_eos(tokenizer, where)  # before the weights load, not after
    if check_tokenizer is not None:
        check_tokenizer(tokenizer)
    try:
        with library_bars_as_lines():
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype or default_dtype(device), **placement, **kwargs)
    except (OSError, ValueError) as err:
        what = "a model directory transformers cannot load" if local.is_dir() else unreachable
        raise IloraError(f"cannot load LLM {source!r}: {what} ({err})") from err
    return model.to(device), tokenizer
