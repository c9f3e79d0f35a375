"""SASRec: the self-attentive sequence encoder used by iLoRA, LLaRA and DLLM2Rec.

The layout follows those projects' ``SASRec`` (one module with ``SASRecModules_ori``'s
attention and feed-forward), so their checkpoints map onto it one tensor for one tensor
(see `ilora.rec.llara_import`):

* ``item_emb``: ``num_items + 1`` rows; row ``num_items`` is the padding id.
* ``pos_emb``: learned, one row per position ``0 .. max_len - 1``, added without
  scaling the item embeddings.
* per block: ``q = attn_norm(x)``; ``a = q + attention(q, x)`` with causal and
  key-padding masks (scores scaled by ``1/sqrt(hidden)``, as in the reference, not by
  the head width); ``f = ffn_norm(a)``; ``x = out_norm(f + w_2(relu(w_1(f))))``;
  padded positions are zeroed after the embeddings and after every block.
* ``final_norm`` and a linear layer ``output`` over the ``num_items`` real items.

The reference also multiplies attention weights by a "query mask" (queries whose
channels sum to exactly 0); that only touches padded rows, whose outputs are zeroed
anyway (or, degenerately, a real row whose normalised query sums to exactly 0.0), so it
is left out.

Initialisation: item and position embeddings are drawn from N(0, 0.01). DLLM2Rec draws its
item embeddings so and keeps PyTorch's default N(0, 1) for positions; LLaRA keeps the default
for both. The other layers keep PyTorch's defaults, as in both.

Histories are left-aligned: positions ``>= length`` are padding. Validity comes from
``length`` alone, so whatever ids sit beyond ``length`` do not change any output at a
valid position. The user representation is the final hidden state at ``length - 1``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ilora.data.dataset import MAX_HISTORY_LEN
from ilora.errors import IloraError

CONFIG_FILE = "config.json"
MAX_BLOCKS = 64  # SASRec uses 1-4; a bound on what a config.json may ask to build
MAX_HIDDEN = 1 << 16
WEIGHTS_FILE = "model.safetensors"
FORMAT = "ilora.sasrec/1"


def id_tensor(x, what: str, device: torch.device | str | None = None) -> torch.Tensor:
    """``x`` (item ids, lengths) as an int64 tensor on ``device``. A float or bool input is an
    `IloraError` naming ``what`` (int64 would truncate 3.5 to 3); a read-only NumPy array (a
    memory-mapped split) is copied, not shared (torch warns that it cannot share one it could write)."""
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        x = np.array(x, copy=True)
    tensor = torch.as_tensor(x, device=device)
    if tensor.numel() and (tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex()):
        raise IloraError(f"{what} must be integers, got {tensor.dtype}")
    return tensor.long()


@dataclass(frozen=True)
class SASRecConfig:
    """Architecture of a SASRec model (saved next to the weights as ``config.json``)."""

    num_items: int
    max_len: int
    hidden: int = 64
    heads: int = 1
    blocks: int = 1
    dropout: float = 0.1
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        sizes = (self.num_items, self.max_len, self.hidden, self.heads, self.blocks)
        if not all(type(v) is int for v in sizes) or not all(type(v) in (int, float) for v in (self.dropout, self.layer_norm_eps)):
            raise IloraError(f"SASRec config: sizes must be integers and dropout / layer_norm_eps numbers ({self})")
        if self.num_items < 1 or self.max_len < 1 or self.hidden < 1 or self.blocks < 1 or self.heads < 1:
            raise IloraError(f"SASRec config: sizes must be positive ({self})")
        if self.blocks > MAX_BLOCKS or self.max_len > MAX_HISTORY_LEN or self.hidden > MAX_HIDDEN:
            # a config.json read from a file is checked here before anything is built from it
            raise IloraError(
                f"SASRec config: blocks={self.blocks}, max_len={self.max_len}, hidden={self.hidden}: at most {MAX_BLOCKS} "
                f"blocks, a history of {MAX_HISTORY_LEN} and a hidden size of {MAX_HIDDEN}"
            )
        if self.hidden % self.heads:
            raise IloraError(f"SASRec config: hidden={self.hidden} is not divisible by heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise IloraError(f"SASRec config: dropout={self.dropout} is not in [0, 1)")
        if not 0.0 < self.layer_norm_eps < float("inf"):  # 0, negative or NaN: every score NaN
            raise IloraError(f"SASRec config: layer_norm_eps={self.layer_norm_eps} is not a positive finite number")

    @property
    def padding_id(self) -> int:
        return self.num_items

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **dataclasses.asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str, path: str | Path = CONFIG_FILE) -> "SASRecConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise IloraError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise IloraError(f"{path}: not an ilora SASRec config (expected \"format\": \"{FORMAT}\")")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise IloraError(f"{path}: unknown SASRec config keys {unknown}")
        try:
            return cls(**data)
        except (TypeError, IloraError) as exc:
            raise IloraError(f"{path}: {exc}") from None


class CausalSelfAttention(nn.Module):
    """Multi-head attention of normalised queries over unnormalised keys/values.

    Scores are divided by ``sqrt(hidden)`` (the reference's choice), heads are contiguous
    channel slices, and the output is not projected (there is no output matrix).
    """

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.scale = hidden**-0.5

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``queries``/``keys`` ``(B, L, H)``, ``valid`` bool ``(B, L)`` -> ``(B, L, H)`` (no residual)."""
        b, length, hidden = queries.shape
        h = self.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, length, h, hidden // h).transpose(1, 2)  # (B, h, L, d)

        q, k, v = split(self.q(queries)), split(self.k(keys)), split(self.v(keys))
        logits = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # (B, h, L, L)
        causal = torch.ones(length, length, dtype=torch.bool, device=queries.device).tril()
        allowed = causal[None, None] & valid[:, None, None, :]
        # Position 0 is always valid, so no row is fully masked.
        logits = logits.masked_fill(~allowed, float("-inf"))
        weights = self.dropout(torch.softmax(logits, dim=-1))
        out = torch.matmul(weights, v)  # (B, h, L, d)
        return out.transpose(1, 2).reshape(b, length, hidden)


class PointwiseFeedForward(nn.Module):
    """``out_norm(x + dropout(w_2(relu(w_1(x)))))``, applied at each position."""

    def __init__(self, hidden: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.w_1 = nn.Linear(hidden, hidden)
        self.w_2 = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.out_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_norm(x + self.dropout(self.w_2(F.relu(self.w_1(x)))))


class SASRecBlock(nn.Module):
    """One attention + feed-forward block (the reference's ``ln_1``, ``mh_attn``, ``ln_2``, ``feed_forward``)."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg.hidden, cfg.heads, cfg.dropout)
        self.ffn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.ffn = PointwiseFeedForward(cfg.hidden, cfg.dropout, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        q = self.attn_norm(x)
        a = q + self.attn(q, x, valid)
        out = self.ffn(self.ffn_norm(a))
        return out * valid.unsqueeze(-1).to(out.dtype)


class SASRec(nn.Module):
    """SASRec over ``cfg.num_items`` items; ``forward`` = `scores`."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.config = cfg
        self.item_emb = nn.Embedding(cfg.num_items + 1, cfg.hidden)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(SASRecBlock(cfg) for _ in range(cfg.blocks))
        self.final_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.output = nn.Linear(cfg.hidden, cfg.num_items)
        nn.init.normal_(self.item_emb.weight, 0.0, 0.01)
        nn.init.normal_(self.pos_emb.weight, 0.0, 0.01)

    @property
    def num_items(self) -> int:
        return self.config.num_items

    @property
    def padding_id(self) -> int:
        return self.config.num_items

    def item_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Raw item embeddings ``(..., hidden)`` of ids in ``0 .. num_items`` (``num_items`` = padding row)."""
        ids = id_tensor(ids, "item ids", self.item_emb.weight.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > self.num_items):
            raise IloraError(f"item ids must be in 0..{self.num_items} (padding {self.num_items}); got {int(ids.min())}..{int(ids.max())}")
        return self.item_emb(ids)

    def _inputs(self, history: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validated long tensors on the model's device and the ``(B, L)`` validity mask."""
        device = self.item_emb.weight.device
        history, length = id_tensor(history, "history ids", device), id_tensor(length, "history lengths", device)
        if history.ndim != 2 or length.shape != history.shape[:1]:
            raise IloraError(f"expected history (B, L) and length (B,); got {tuple(history.shape)} and {tuple(length.shape)}")
        width = history.shape[1]
        if width > self.config.max_len:
            raise IloraError(f"history width {width} exceeds the model's max_len {self.config.max_len}")
        outside = (length < 1) | (length > width)
        if bool(outside.any()):
            row = int(outside.nonzero()[0, 0])
            raise IloraError(
                f"history lengths must be in 1..{width} (a user representation reads the last history item); "
                f"sample {row} of the batch has length {int(length[row])}"
            )
        valid = torch.arange(width, device=device)[None, :] < length[:, None]
        bad = valid & ((history < 0) | (history >= self.num_items))
        if bad.any():
            row, col = (int(i) for i in bad.nonzero()[0])
            raise IloraError(f"history row {row}, position {col}: id {int(history[row, col])} is not an item (0..{self.num_items - 1})")
        history = history.masked_fill(~valid, self.padding_id)
        return history, length, valid

    def hidden_states(self, history: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``(B, L, hidden)``; padded positions hold ``final_norm(0)``."""
        history, _length, valid = self._inputs(history, length)
        mask = valid.unsqueeze(-1).to(self.item_emb.weight.dtype)
        positions = torch.arange(history.shape[1], device=history.device)
        x = self.emb_dropout(self.item_emb(history) + self.pos_emb(positions)[None]) * mask
        for block in self.blocks:
            x = block(x, valid)
        return self.final_norm(x)

    def user_representation(self, history: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """The hidden state at the last valid position ``length - 1``: ``(B, hidden)``."""
        states = self.hidden_states(history, length)
        index = torch.as_tensor(length, dtype=torch.long, device=states.device) - 1
        return states[torch.arange(states.shape[0], device=states.device), index]

    def scores(self, history: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Logits over the real items ``(B, num_items)`` (the padding id has no score)."""
        return self.output(self.user_representation(history, length))

    def forward(self, history: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        return self.scores(history, length)

    def save(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory``; return it."""
        from ilora.state_io import atomic_write_text, save_tensors

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_tensors(tensors, directory / WEIGHTS_FILE, metadata={"format": FORMAT})
        atomic_write_text(directory / CONFIG_FILE, self.config.to_json() + "\n")  # a temporary file renamed: never half-written, never through a link
        return directory


def sasrec_with_weights(cfg: SASRecConfig, tensors: dict[str, torch.Tensor], source: str | Path) -> SASRec:
    """A `SASRec` of ``cfg`` holding ``tensors``, whose names, shapes and dtypes are checked
    against ``cfg`` before the model is allocated (a config that does not fit its weights, say
    a huge ``max_len``, is a clear error instead of an allocation failure)."""
    with torch.device("meta"):
        expected = SASRec(cfg).state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise IloraError(f"{source}: weights do not match the SASRec config (missing {missing}, unexpected {unexpected})")
    for name, ref in expected.items():
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise IloraError(f"{source}: {name} has shape {tuple(tensors[name].shape)}; the SASRec config expects {tuple(ref.shape)}")
        if not tensors[name].is_floating_point():
            raise IloraError(f"{source}: {name} has dtype {tensors[name].dtype}, expected a floating point tensor")
    model = SASRec(cfg)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    return model


def load_sasrec(directory: str | Path, *, device: str | torch.device = "cpu") -> SASRec:
    """Load a model written by `SASRec.save`, in eval mode."""
    from ilora.state_io import load_tensors

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise IloraError(f"{path}: not found (expected a SASRec model directory written by `ilora rec train`)")
    cfg = SASRecConfig.from_json(config_path.read_text(encoding="utf-8"), config_path)
    tensors = load_tensors(weights_path, "SASRec's weights")
    return sasrec_with_weights(cfg, tensors, weights_path).to(device).eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_sasrec_items(rec: SASRec, num_items: int, source: str | Path = "SASRec", history_width: int | None = None) -> None:
    """`IloraError` unless ``rec`` (read from ``source``) was trained on a catalog of ``num_items``
    items and, given ``history_width`` (the dataset's), reads histories that wide."""
    if rec.config.num_items != num_items:
        raise IloraError(f"{source}: this SASRec was trained on {rec.config.num_items} items but the dataset has {num_items} (a SASRec of another dataset?)")
    if history_width is not None and history_width > rec.config.max_len:
        raise IloraError(
            f"{source}: this SASRec reads histories of at most {rec.config.max_len} items, but the dataset's are {history_width} "
            "wide (a SASRec trained with another --max-len?)"
        )
