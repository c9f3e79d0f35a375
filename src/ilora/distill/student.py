"""The distilled student: the project's SASRec with DLLM2Rec's collaborative embedding distillation.

Each item's embedding is its own row plus ``w_ed`` times a learned linear map of the
teacher's embedding of that item::

    item_emb(i) = E[i] + w_ed * (W t_i + b)        W: (hidden, H_teacher), t_i: teacher row

``H_teacher`` is the width of the teacher's table (read from the file, never fixed).
The combined embedding is what `SASRec.item_embeddings` returns and what the sequence
encoder reads for the history; a lookup projects only the teacher rows of the ids it
looks up (each distinct id once), as DLLM2Rec does, not the whole teacher table. The
scores over items come, as in DLLM2Rec, from the SASRec's separate ``output`` layer (DLLM2Rec's ``s_fc``): DLLM2Rec adds the teacher term
to the input embeddings only and never ties the output layer to them, so neither do we.
The padding row gets ``E[pad] + w_ed * b``; padded positions are zeroed by the encoder,
so it has no effect.

The projection is initialised from its own generator (``seed``), like ``nn.Linear``'s
default (uniform in ``+-1/sqrt(H_teacher)``), so building a student draws exactly as
many numbers from torch's global generator as building a plain `SASRec`: with the same
seed both start from the same weights and see the same dropout draws.

`DistilledSASRec.folded` turns a trained student into a plain `SASRec` whose item table
is the combined table, so it saves, loads (`ilora.rec.sasrec.load_sasrec`) and
evaluates like any SASRec, without the teacher's embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ilora.errors import IloraError
from ilora.rec.sasrec import SASRec, SASRecConfig


class DistilledItemEmbedding(nn.Embedding):
    """An item table ``E + w_ed * Linear(teacher)``: ``weight`` is ``E``; `table` is the combined table.

    The teacher's table is a non-persistent buffer with one zero row appended for the
    padding id; it is not trained and not saved in ``state_dict``.
    """

    def __init__(self, own: nn.Embedding, teacher: torch.Tensor, w_ed: float, generator: torch.Generator) -> None:
        super().__init__(own.num_embeddings, own.embedding_dim, _weight=own.weight.data)
        num_items, width = teacher.shape
        if num_items + 1 != own.num_embeddings:
            raise IloraError(f"teacher item embeddings have {num_items} rows; the student has {own.num_embeddings - 1} items")
        self.w_ed = float(w_ed)
        pad = torch.zeros(1, width, dtype=torch.float32)
        self.register_buffer("teacher", torch.cat([teacher.detach().float().cpu(), pad]), persistent=False)
        self.proj = nn.utils.skip_init(nn.Linear, width, own.embedding_dim)
        bound = width**-0.5
        with torch.no_grad():
            self.proj.weight.copy_(torch.rand(self.proj.weight.shape, generator=generator) * 2 * bound - bound)
            self.proj.bias.copy_(torch.rand(self.proj.bias.shape, generator=generator) * 2 * bound - bound)

    def table(self) -> torch.Tensor:
        """The combined ``(num_items + 1, hidden)`` item table."""
        return self.weight + self.w_ed * self.proj(self.teacher)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``E[ids] + w_ed * (W t_ids + b)``, the rows of `table` for ``ids``: only the teacher
        rows the batch looks up are projected, each distinct id once (not the whole table)."""
        unique, inverse = torch.unique(ids, return_inverse=True)
        projected = self.proj(self.teacher[unique])
        return F.embedding(ids, self.weight) + self.w_ed * F.embedding(inverse, projected)


class DistilledSASRec(SASRec):
    """`SASRec` whose ``item_emb`` is a `DistilledItemEmbedding`; saves as a plain, folded SASRec."""

    def __init__(self, cfg: SASRecConfig, teacher_embeddings: torch.Tensor, *, w_ed: float, seed: int) -> None:
        super().__init__(cfg)
        teacher_embeddings = torch.as_tensor(teacher_embeddings)
        if teacher_embeddings.ndim != 2 or teacher_embeddings.shape[0] != cfg.num_items:
            raise IloraError(
                f"teacher item embeddings have shape {tuple(teacher_embeddings.shape)}, expected ({cfg.num_items}, H)"
            )
        generator = torch.Generator().manual_seed(seed)
        self.item_emb = DistilledItemEmbedding(self.item_emb, teacher_embeddings, w_ed, generator)

    def folded(self) -> SASRec:
        """A plain `SASRec` (on CPU, eval mode) with ``item_emb.weight`` = the combined table."""
        state = {k: v.detach().cpu() for k, v in self.state_dict().items() if not k.startswith("item_emb.proj.")}
        with torch.no_grad():
            state["item_emb.weight"] = self.item_emb.table().detach().cpu()
        with torch.random.fork_rng(devices=[]):
            plain = SASRec(self.config)
        plain.load_state_dict(state)
        return plain.eval()

    def save(self, directory: str | Path) -> Path:
        """Save `folded` (``model.safetensors`` + ``config.json``, what `load_sasrec` reads)."""
        return self.folded().save(directory)


def student_factory(teacher_embeddings: torch.Tensor | None, *, w_ed: float, seed: int):
    """A ``model_factory`` for `ilora.rec.train.train_sasrec`: the distilled student, or plain SASRec without a teacher table."""
    if teacher_embeddings is None:
        return SASRec
    return lambda cfg: DistilledSASRec(cfg, teacher_embeddings, w_ed=w_ed, seed=seed)
