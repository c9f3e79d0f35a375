"""Building a teacher from a config, saving it, and loading it back (one function).

Checkpoint directory layout (everything needed to run the teacher offline):

    teacher_config.json          TeacherConfig + format version + catalog fingerprint
    adapter_model.safetensors    LoRA experts in peft's key layout (rank E*r)
    adapter_config.json          peft LoRA config (a peft tool reads the uniform-gate model)
    ilora_adapter.json           the experts' layout: E, rank per expert, alpha, scaling
    gate.safetensors             the gate network
    projector.safetensors        the item projector
    added_embeddings.safetensors input/output embedding rows of the added placeholder tokens
    tokenizer/                   the tokenizer, placeholder tokens included
    llm/                         the base LLM itself, only for --llm tiny (it cannot be re-downloaded)
    rec/                         the frozen SASRec the gate and the placeholders read

`load_teacher` is the only way to load one: it rebuilds the model, injects the adapters,
loads the gate network and projector together, so a reloaded teacher can never run
without its gate.

Both `build_teacher` and `load_teacher` first check that every catalog title can go
into a prompt (`ilora.data.dataset.validate_prompt_titles`: not empty, one line, no
control character), before any model is built or read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ilora.config import from_dict, to_dict
from ilora.data.dataset import Catalog, validate_prompt_titles
from ilora.errors import IloraError
from ilora.rec.sasrec import SASRec, load_sasrec
from ilora.state_io import atomic_write_text, read_json, save_tensors
from ilora.teacher.adapters import GateState, adapter_parameters, inject_gated_lora, load_adapters, save_adapters
from ilora.teacher.batch import PromptCollator, TitleTable
from ilora.teacher.config import TeacherConfig
from ilora.teacher.gate import build_gate
from ilora.teacher.model import ILoRATeacher
from ilora.teacher.projector import ItemProjector
from ilora.teacher.prompts import load_template
from ilora.teacher.tiny import add_placeholder_tokens, build_tiny_llm, build_tiny_tokenizer, default_dtype, load_llm

FORMAT = "ilora-teacher"
FORMAT_VERSION = 1


@dataclass
class TeacherBundle:
    """A teacher and what feeds it: the collators for prompts with and without answers."""

    teacher: ILoRATeacher
    config: TeacherConfig
    train_collator: PromptCollator
    prompt_collator: PromptCollator


def catalog_fingerprint(catalog: Catalog) -> str:
    h = hashlib.sha256()
    for title in catalog.titles:
        h.update(title.encode("utf-8", "surrogatepass") + b"\x00")
    return h.hexdigest()[:16]


def _tokenizer_corpus(catalog: Catalog, cfg: TeacherConfig) -> list[str]:
    template = load_template(cfg.domain)
    return list(catalog.titles) + list(template.pieces) * 50


def _base_llm(cfg: TeacherConfig, catalog: Catalog, device: str):
    if cfg.llm == "tiny":
        tokenizer = build_tiny_tokenizer(_tokenizer_corpus(catalog, cfg), vocab_size=cfg.tiny_vocab, style=cfg.tiny_arch)
        llm = build_tiny_llm(tokenizer, arch=cfg.tiny_arch, hidden=cfg.tiny_hidden, layers=cfg.tiny_layers, heads=cfg.tiny_heads, seed=cfg.seed)
        return llm.to(device=device, dtype=default_dtype(device)), tokenizer
    return load_llm(cfg.llm, device=device, trust_remote_code=cfg.trust_remote_code)


def assemble(cfg: TeacherConfig, catalog: Catalog, rec: SASRec, llm, tokenizer, device: str, checkpoint: Path | None = None) -> TeacherBundle:
    """Placeholders, adapters, gate, projector and collators around a base LLM.

    Fresh adapters, gate network and projector, or, with ``checkpoint``, the ones saved
    there: all three together, so a loaded teacher can never lack its gate.
    """
    from safetensors.torch import load_file

    placeholders = add_placeholder_tokens(tokenizer, llm)
    adapter_cfg = cfg.adapter_config()
    state = GateState(adapter_cfg.num_experts)
    if checkpoint is None:
        inject_gated_lora(llm, adapter_cfg, state)
    else:
        load_adapters(llm, checkpoint, state)
    rec_dim = rec.config.hidden
    gate_net = build_gate(cfg.gate_config(), rec_dim, adapter_cfg.num_experts)
    projector = ItemProjector(rec_dim, llm.config.hidden_size)
    if checkpoint is not None:
        gate_net.load_state_dict(load_file(str(checkpoint / "gate.safetensors")))
        projector.load_state_dict(load_file(str(checkpoint / "projector.safetensors")))
    titles = TitleTable.build(tokenizer, catalog.titles, max_title_tokens=cfg.max_title_tokens)
    teacher = ILoRATeacher(llm, tokenizer, rec, gate_net, projector, state, titles, adapter_cfg.num_experts).to(device)
    template = load_template(cfg.domain)
    train_collator = PromptCollator(tokenizer, template, titles, placeholders, with_answer=True)
    prompt_collator = PromptCollator(tokenizer, template, titles, placeholders, with_answer=False)
    return TeacherBundle(teacher, cfg, train_collator, prompt_collator)


def build_teacher(cfg: TeacherConfig, catalog: Catalog, rec: SASRec, device: str = "cpu") -> TeacherBundle:
    """A fresh teacher: base LLM (frozen) + new adapters, gate network and projector."""
    validate_prompt_titles(catalog)
    if rec.config.num_items != catalog.num_items:
        raise IloraError(f"SASRec was trained on {rec.config.num_items} items but the dataset has {catalog.num_items}")
    torch.manual_seed(cfg.seed)
    llm, tokenizer = _base_llm(cfg, catalog, device)
    return assemble(cfg, catalog, rec.to(device), llm, tokenizer, device)


def _added_rows(teacher: ILoRATeacher) -> dict[str, torch.Tensor]:
    ids = torch.tensor(teacher.tokenizer.convert_tokens_to_ids(["[HistoryEmb]", "[CansEmb]", "[PH]"]))
    rows = {"ids": ids, "input": teacher.llm.get_input_embeddings().weight[ids]}
    out = teacher.llm.get_output_embeddings()
    if out is not None and out.weight.shape[0] > int(ids.max()):
        rows["output"] = out.weight[ids]
    return rows


def save_teacher(bundle: TeacherBundle, out_dir: str | Path, catalog: Catalog, rec_dir: str | Path | None = None) -> None:
    """Write a teacher checkpoint (layout in the module docstring)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher, cfg = bundle.teacher, bundle.config
    save_adapters(teacher.llm, cfg.adapter_config(), out, base_model_name_or_path=cfg.llm)
    save_tensors(teacher.gate_net.state_dict(), out / "gate.safetensors")
    save_tensors(teacher.projector.state_dict(), out / "projector.safetensors")
    save_tensors(_added_rows(teacher), out / "added_embeddings.safetensors")
    teacher.tokenizer.save_pretrained(out / "tokenizer")
    if cfg.llm == "tiny" and not (out / "llm").exists():
        base = _base_copy(teacher)
        base.save_pretrained(out / "llm", safe_serialization=True)
    if not (out / "rec").exists():
        teacher.rec.save(out / "rec")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "catalog": catalog_fingerprint(catalog), "config": to_dict(cfg)}
    atomic_write_text(out / "teacher_config.json", json.dumps(meta, indent=2))


def _base_copy(teacher: ILoRATeacher):
    """The tiny base LLM without adapters (a fresh model with the base weights)."""
    from transformers import AutoModelForCausalLM

    from ilora.teacher.adapters import gated_lora_modules

    base = AutoModelForCausalLM.from_config(teacher.llm.config)
    state = {}
    adapted = gated_lora_modules(teacher.llm)
    for name, tensor in teacher.llm.state_dict().items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        for path in adapted:
            prefix = f"{path}.base_layer."
            if name.startswith(prefix):
                name = f"{path}.{name[len(prefix):]}"
                break
        state[name] = tensor
    base.load_state_dict(state, strict=True)
    return base


def read_teacher_config(ckpt: str | Path) -> tuple[TeacherConfig, dict]:
    path = Path(ckpt) / "teacher_config.json"
    meta = read_json(path, "teacher checkpoint config (is this a teacher directory?)")
    if meta.get("format") != FORMAT:
        raise IloraError(f"{path}: not an ilora teacher checkpoint")
    return from_dict(TeacherConfig, meta["config"]), meta


def load_teacher(ckpt: str | Path, catalog: Catalog, device: str = "cpu") -> TeacherBundle:
    """Load a teacher checkpoint: base LLM, adapters, gate network and projector together."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = Path(ckpt)
    validate_prompt_titles(catalog)
    cfg, meta = read_teacher_config(ckpt)
    if meta.get("catalog") != catalog_fingerprint(catalog):
        raise IloraError(f"{ckpt}: the teacher was trained on another item catalog than this dataset's")
    rec = load_sasrec(ckpt / "rec").to(device)
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    if cfg.llm == "tiny":
        llm = AutoModelForCausalLM.from_pretrained(ckpt / "llm", dtype=default_dtype(device)).to(device)
    else:
        llm, _ = load_llm(cfg.llm, device=device, trust_remote_code=cfg.trust_remote_code)
    if llm.get_input_embeddings().weight.shape[0] < len(tokenizer):
        llm.resize_token_embeddings(len(tokenizer))
    rows = load_file(str(ckpt / "added_embeddings.safetensors"))
    with torch.no_grad():
        ids = rows["ids"].to(device)
        llm.get_input_embeddings().weight[ids] = rows["input"].to(device, llm.dtype)
        if "output" in rows:
            llm.get_output_embeddings().weight[ids] = rows["output"].to(device, llm.dtype)
    return assemble(cfg, catalog, rec, llm, tokenizer, device, checkpoint=ckpt)


def trainable_parameters(teacher: ILoRATeacher) -> dict[str, list[torch.nn.Parameter]]:
    return {
        "adapters": adapter_parameters(teacher.llm),
        "gate": list(teacher.gate_net.parameters()),
        "projector": list(teacher.projector.parameters()),
    }
