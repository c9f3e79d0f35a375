"""Building a teacher from a config, saving it, and loading it back (one function).

Checkpoint directory layout (everything needed to run the teacher offline):

    teacher_config.json          TeacherConfig + format version + fingerprints of the catalog,
                                 of rec/, (tiny) of llm/ and of every part below, a sample
                                 of the base LLM's weights, and the prompt template used
                                 (its three pieces: the teacher reads no template file); written last
    adapter_model.safetensors    LoRA experts in peft's key layout (rank E*r)
    adapter_config.json          peft LoRA config (a peft tool reads the uniform-gate model)
    ilora_adapter.json           the experts' layout: E, rank per expert, alpha, scaling
    gate.safetensors             the gate network
    projector.safetensors        the item projector
    added_embeddings.safetensors input/output embedding rows of the added placeholder tokens
    tokenizer/                   the tokenizer, placeholder tokens included
    llm/                         the base LLM itself, only for --llm tiny (it cannot be re-downloaded);
                                 any other base LLM is only named (``config.llm``: a path or hub id)
    rec/                         the frozen SASRec the gate and the placeholders read

Every `save_teacher` writes every part, ``rec/`` and ``llm/`` included, so a directory
saved into again (a new run with the same ``--out``) never keeps the SASRec or base LLM
of an earlier run. ``rec/`` and ``llm/`` are each written beside and then swapped in.

`load_teacher` is the only way to load one: it checks the format version and the
fingerprints (`rec_fingerprint` of the loaded SASRec, `directory_fingerprint` of
``llm/``, `base_weights_sample` of a named base LLM, `part_fingerprints` of the other parts)
against ``teacher_config.json`` (a save interrupted part-way, new adapters beside an old gate
say, or another model at the base LLM's path, is refused), rebuilds the model,
injects the adapters, loads the gate network and projector together, so a reloaded teacher can never run
without its gate. A file that is missing or does not fit the saved config raises
`IloraError` naming it.

Both `build_teacher` and `load_teacher` first check that every catalog title can go
into a prompt (`ilora.data.dataset.validate_prompt_titles`: not empty, one line, no
control character), before any model is built or read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ilora.config import from_dict, to_dict
from ilora.data.dataset import Catalog, validate_prompt_titles
from ilora.errors import ConfigError, IloraError
from ilora.progress import library_bars_as_lines
from ilora.rec.sasrec import SASRec, check_sasrec_items, load_sasrec
from ilora.state_io import atomic_write_text, file_sha256, load_tensors, read_json, save_tensors
from ilora.teacher.adapters import GateState, adapter_parameters, inject_gated_lora, load_adapters, save_adapters
from ilora.teacher.batch import PromptCollator, TitleTable, check_titles_given_back
from ilora.teacher.config import TeacherConfig, with_added_defaults
from ilora.teacher.gate import build_gate
from ilora.teacher.model import ILoRATeacher, check_head_logits
from ilora.teacher.projector import ItemProjector
from ilora.teacher.prompts import PromptTemplate, load_template
from ilora.teacher.shared_input import share_adapter_inputs
from ilora.teacher.tiny import add_placeholder_tokens, build_tiny_llm, build_tiny_tokenizer, check_vocab_covers_tokenizer, default_dtype, load_llm

FORMAT = "ilora-teacher"
FORMAT_VERSION = 3  # 2: rec/ and llm/ fingerprints in teacher_config.json; 3: and of every other part
READABLE_VERSIONS = (1, 2, 3)  # 1 loads without the fingerprint checks (it has none), 2 without the parts', with a warning
# the parts `save_teacher` writes beside teacher_config.json (files, and the tokenizer directory)
PART_FILES = ("adapter_model.safetensors", "adapter_config.json", "ilora_adapter.json", "gate.safetensors", "projector.safetensors", "added_embeddings.safetensors")

log = logging.getLogger(__name__)


@dataclass
class TeacherBundle:
    """A teacher and what feeds it: the collators for prompts with and without answers."""

    teacher: ILoRATeacher
    config: TeacherConfig
    train_collator: PromptCollator
    prompt_collator: PromptCollator


def rec_fingerprint(rec: SASRec) -> str:
    """sha256 (16 hex digits) of a SASRec's config and weights (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256(rec.config.to_json().encode("utf-8"))
    for name, tensor in sorted(rec.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"\x00{name}\x00{flat.dtype}\x00{tuple(tensor.shape)}\x00".encode())
        h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()[:16]


SAMPLED_EMBEDDING_ROWS = 32


def base_weights_sample(llm: nn.Module) -> str:
    """sha256 (16 hex digits) of a cheap sample of a base LLM's frozen weights: its first
    `SAMPLED_EMBEDDING_ROWS` input-embedding rows and every 1-D parameter (the norms' weights,
    biases), in order, rounded to bfloat16. Neither the adapters, nor the placeholder rows
    (appended after the vocabulary), nor the dtype the model is loaded in (bf16 on CUDA, float32
    on the CPU) change it; another checkpoint of the same architecture (a chat or other
    fine-tune of the same base) does. Reads about a megabyte of a 7B model."""
    h = hashlib.sha256()
    rows = llm.get_input_embeddings().weight[:SAMPLED_EMBEDDING_ROWS]
    vectors = [p for p in llm.parameters() if p.dim() == 1 and p.is_floating_point()]
    for tensor in (rows, *vectors):
        flat = tensor.detach().to("cpu", torch.bfloat16).contiguous().reshape(-1)
        h.update(f"\x00{tuple(tensor.shape)}\x00".encode())
        h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def part_fingerprints(ckpt: Path) -> dict[str, str | None]:
    """sha256 (16 hex digits) of each of `PART_FILES` and `directory_fingerprint` of
    ``tokenizer/``; None for a part that is missing."""
    out: dict[str, str | None] = {name: file_sha256(ckpt / name)[:16] if (ckpt / name).is_file() else None for name in PART_FILES}
    out["tokenizer/"] = directory_fingerprint(ckpt / "tokenizer") if (ckpt / "tokenizer").is_dir() else None
    return out


def directory_fingerprint(directory: Path) -> str:
    """sha256 (16 hex digits) of the names and bytes of the ``*.json`` and ``*.safetensors``
    files directly in ``directory`` (in name order)."""
    h = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors")):
        h.update(f"{path.name}\x00{path.stat().st_size}\x00".encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _tokenizer_corpus(catalog: Catalog, cfg: TeacherConfig) -> list[str]:
    template = load_template(cfg.domain)
    return list(catalog.titles) + list(template.pieces) * 50


def _base_llm(cfg: TeacherConfig, catalog: Catalog, device: str):
    if cfg.llm == "tiny":  # its tokenizer is trained on the titles (a byte-fallback BPE): it gives every one back
        tokenizer = build_tiny_tokenizer(_tokenizer_corpus(catalog, cfg), vocab_size=cfg.tiny_vocab, style=cfg.tiny_arch)
        llm = build_tiny_llm(tokenizer, arch=cfg.tiny_arch, hidden=cfg.tiny_hidden, layers=cfg.tiny_layers, heads=cfg.tiny_heads, seed=cfg.seed)
        return llm.to(device=device, dtype=default_dtype(device)), tokenizer
    titles_check = lambda tokenizer: check_titles_given_back(tokenizer, catalog.titles, f"the tokenizer of {cfg.llm}")  # noqa: E731
    return load_llm(cfg.llm, device=device, trust_remote_code=cfg.trust_remote_code, check_tokenizer=titles_check)


def assemble(
    cfg: TeacherConfig, catalog: Catalog, rec: SASRec, llm, tokenizer, device: str, checkpoint: Path | None = None,
    template: PromptTemplate | None = None,
) -> TeacherBundle:
    """Placeholders, adapters, gate, projector and collators around a base LLM.

    Fresh adapters, gate network and projector, or, with ``checkpoint``, the ones saved
    there: all three together, so a loaded teacher can never lack its gate. ``template``:
    the prompt template a checkpoint recorded (None: ``cfg.domain``'s).
    """
    check_head_logits(llm)
    placeholders = add_placeholder_tokens(tokenizer, llm)
    adapter_cfg = cfg.adapter_config()
    state = GateState(adapter_cfg.num_experts)
    if checkpoint is None:
        inject_gated_lora(llm, adapter_cfg, state)
    else:
        load_adapters(llm, checkpoint, state)
    if cfg.share_adapter_inputs:
        share_adapter_inputs(llm)
    rec_dim = rec.config.hidden
    gate_net = build_gate(cfg.gate_config(), rec_dim, adapter_cfg.num_experts)
    projector = ItemProjector(rec_dim, llm.config.hidden_size)
    if checkpoint is not None:
        gate_cfg = cfg.gate_config()
        _load_checked(gate_net, checkpoint / "gate.safetensors", f"gate network ({gate_cfg.kind}, hidden {gate_cfg.hidden}, {adapter_cfg.num_experts} experts, SASRec width {rec_dim})")
        _load_checked(projector, checkpoint / "projector.safetensors", f"projector (SASRec width {rec_dim} -> LLM width {llm.config.hidden_size})")
    titles = TitleTable.build(tokenizer, catalog.titles, max_title_tokens=cfg.max_title_tokens)
    teacher = ILoRATeacher(llm, tokenizer, rec, gate_net, projector, state, titles, adapter_cfg.num_experts).to(device)
    template = template or load_template(cfg.domain)
    train_collator = PromptCollator(tokenizer, template, titles, placeholders, with_answer=True)
    prompt_collator = PromptCollator(tokenizer, template, titles, placeholders, with_answer=False)
    return TeacherBundle(teacher, cfg, train_collator, prompt_collator)


def _load_checked(module: torch.nn.Module, path: Path, what: str) -> None:
    """Load ``path`` into ``module`` after checking that its tensor names and shapes are the
    module's; `IloraError` naming the file and ``what`` (the module the config describes) otherwise."""
    saved, expected = load_tensors(path, f"the teacher's {what}"), module.state_dict()
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    wrong = [k for k in sorted(set(expected) & set(saved)) if saved[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        problem = (
            f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
            else f"{wrong[0]} has shape {tuple(saved[wrong[0]].shape)}, expected {tuple(expected[wrong[0]].shape)}"
        )
        raise IloraError(f"{path}: does not fit the {what} of teacher_config.json ({problem})")
    module.load_state_dict(saved)


def resolve_llm_path(cfg: TeacherConfig) -> TeacherConfig:
    """``cfg`` with a base LLM that is a local directory named by its absolute path: the teacher
    checkpoint records ``cfg.llm``, and a relative path would later be looked up from wherever
    a command runs (a hub id, or "tiny", is left as it is)."""
    path = Path(cfg.llm).expanduser()
    if cfg.llm == "tiny" or not path.is_dir():
        return cfg
    return dataclasses.replace(cfg, llm=str(path.resolve()))


def build_teacher(cfg: TeacherConfig, catalog: Catalog, rec: SASRec, device: str = "cpu") -> TeacherBundle:
    """A fresh teacher: base LLM (frozen) + new adapters, gate network and projector.

    Its random initialisation depends only on ``cfg.seed``; torch's global random state (CPU,
    and ``device``'s when it is CUDA) is left as it was.
    """
    validate_prompt_titles(catalog)
    check_sasrec_items(rec, catalog.num_items)
    cuda = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
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


def save_teacher(bundle: TeacherBundle, out_dir: str | Path, catalog: Catalog) -> None:
    """Write a teacher checkpoint (layout in the module docstring): every part, every time.

    ``rec/`` (the teacher's SASRec) and, for ``llm == "tiny"``, ``llm/`` (its base LLM
    without adapters) are rewritten at each save through `_replace_directory`, so they are
    always the ones of the teacher saved; ``teacher_config.json``, written last, records
    their fingerprints for `load_teacher` to check.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher, cfg = bundle.teacher, bundle.config
    save_adapters(teacher.llm, cfg.adapter_config(), out, base_model_name_or_path=cfg.llm)
    save_tensors(teacher.gate_net.state_dict(), out / "gate.safetensors")
    save_tensors(teacher.projector.state_dict(), out / "projector.safetensors")
    save_tensors(_added_rows(teacher), out / "added_embeddings.safetensors")
    teacher.tokenizer.save_pretrained(out / "tokenizer")
    llm_fingerprint = None
    if cfg.llm == "tiny":
        base = _base_copy(teacher)
        with library_bars_as_lines():
            llm_fingerprint = directory_fingerprint(_replace_directory(out / "llm", lambda d: base.save_pretrained(d, safe_serialization=True)))
    _replace_directory(out / "rec", teacher.rec.save)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "catalog": catalog.sha256(),
        "rec": rec_fingerprint(teacher.rec), "llm": llm_fingerprint, "llm_sample": base_weights_sample(teacher.llm),
        "parts": part_fingerprints(out), "config": to_dict(cfg), "template": bundle.train_collator.template.to_dict(),
    }
    atomic_write_text(out / "teacher_config.json", json.dumps(meta, indent=2))


def _replace_directory(target: Path, write: Callable[[Path], object]) -> Path:
    """``write(d)`` into a new sibling directory ``d``, then swap it in for ``target``; returns ``target``.

    The old ``target`` (if any) is renamed aside before the new one is renamed in, then
    deleted, so ``target`` is either the old or the new complete directory, or (after a
    crash between the two renames) absent.
    """
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    new, old = target.with_name(f".{target.name}.new-{tag}"), target.with_name(f".{target.name}.old-{tag}")
    new.mkdir()
    try:
        write(new)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


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
    """The `TeacherConfig` and the whole metadata of ``ckpt/teacher_config.json``.

    Raises `IloraError` naming the file if it is not an ilora teacher config of a
    readable version (`READABLE_VERSIONS`), lacks an entry, or holds an invalid config.
    """
    path = Path(ckpt) / "teacher_config.json"
    meta = read_json(path, "teacher checkpoint config (is this a teacher directory?)")
    if meta.get("format") != FORMAT:
        raise IloraError(f"{path}: not an ilora teacher checkpoint (format {meta.get('format')!r}, expected {FORMAT!r})")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise IloraError(
            f"{path}: format_version {version!r} is not supported (this ilora reads {', '.join(map(str, READABLE_VERSIONS))})"
        )
    required = (("config", dict), ("catalog", str)) + ((("rec", str),) if version >= 2 else ())
    for key, kind in required:
        if not isinstance(meta.get(key), kind):
            raise IloraError(f"{path}: entry {key!r} is missing or not a {'JSON object' if kind is dict else 'string'}")
    try:
        cfg = from_dict(TeacherConfig, with_added_defaults(meta["config"]))
    except IloraError as exc:
        raise IloraError(f"{path}: invalid teacher config ({exc})") from None
    if version >= 2 and cfg.llm == "tiny" and not isinstance(meta.get("llm"), str):
        raise IloraError(f"{path}: entry 'llm' (the fingerprint of llm/) is missing or not a string")
    return cfg, meta


def load_teacher(ckpt: str | Path, catalog: Catalog, device: str = "cpu", *, trust_remote_code: bool = False) -> TeacherBundle:
    """Load a teacher checkpoint: base LLM, adapters, gate network and projector together.

    First checks ``teacher_config.json`` (`read_teacher_config`), the catalog, and that
    ``rec/`` and (tiny) ``llm/`` are the ones the teacher was saved with; any mismatch,
    missing or misfitting file raises `IloraError` naming it.

    ``trust_remote_code`` is the caller's (the user's) decision, never the checkpoint's: a
    teacher saved with ``trust_remote_code`` is refused unless the caller passes it, and the
    saved tokenizer and tiny LLM load without it (transformers would otherwise ask on stdin
    whether to run code a crafted checkpoint names).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = Path(ckpt)
    validate_prompt_titles(catalog)
    cfg, meta = read_teacher_config(ckpt)
    if cfg.trust_remote_code and not trust_remote_code:
        raise IloraError(
            f"{ckpt}: this teacher was trained with trust_remote_code (its base LLM runs Python code from the model "
            "repository); pass --trust-remote-code (ilora run: teacher.trust_remote_code=true) if you trust that code"
        )
    if meta.get("catalog") != catalog.sha256():
        raise IloraError(f"{ckpt}: the teacher was trained on another item catalog than this dataset's")
    template = saved_template(ckpt, cfg, meta)  # before any model loads
    fingerprints = meta["format_version"] >= 2
    if not fingerprints:
        log.warning(
            "%s: saved by an older ilora (format 1) without fingerprints of rec/ and llm/: cannot check they are "
            "the ones this teacher was trained with; save it again to record them", ckpt
        )
    if meta["format_version"] >= 3:
        check_parts(ckpt, meta.get("parts"))
    else:
        log.warning("%s: saved by an older ilora (format %s) without fingerprints of its parts: cannot check they "
                    "belong together; save it again to record them", ckpt, meta["format_version"])
    rec = load_sasrec(ckpt / "rec")
    if fingerprints and rec_fingerprint(rec) != meta["rec"]:
        raise IloraError(f"{ckpt / 'rec'}: not the SASRec this teacher was saved with (fingerprint differs from teacher_config.json's)")
    rec = rec.to(device)
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "tokenizer", trust_remote_code=trust_remote_code and cfg.llm != "tiny")
    check_titles_given_back(tokenizer, catalog.titles, f"the tokenizer of {ckpt}")  # before the base LLM loads
    if cfg.llm == "tiny":
        llm_dir = ckpt / "llm"
        if not llm_dir.is_dir() or (fingerprints and directory_fingerprint(llm_dir) != meta["llm"]):
            raise IloraError(f"{llm_dir}: missing, or not the base LLM this teacher was saved with (fingerprint differs from teacher_config.json's)")
        with library_bars_as_lines():
            llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=default_dtype(device), trust_remote_code=False).to(device)
    else:
        llm, _ = load_llm(cfg.llm, device=device, trust_remote_code=trust_remote_code)
        check_base_llm(ckpt, cfg.llm, llm, meta.get("llm_sample"))
    check_vocab_covers_tokenizer(llm, tokenizer)  # before the resize below makes rows of its own
    if llm.get_input_embeddings().weight.shape[0] < len(tokenizer):  # the placeholder rows, overwritten below
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    rows = load_tensors(ckpt / "added_embeddings.safetensors", "the teacher's placeholder embedding rows")
    hidden = llm.get_input_embeddings().weight.shape[1]
    if set(rows) - {"output"} != {"ids", "input"} or rows["input"].shape != (rows["ids"].numel(), hidden):
        raise IloraError(f"{ckpt / 'added_embeddings.safetensors'}: expected 'ids', 'input' ({hidden} columns) and optionally 'output'")
    with torch.no_grad():
        ids = rows["ids"].to(device)
        llm.get_input_embeddings().weight[ids] = rows["input"].to(device, llm.dtype)
        if "output" in rows:
            llm.get_output_embeddings().weight[ids] = rows["output"].to(device, llm.dtype)
    return assemble(cfg, catalog, rec, llm, tokenizer, device, checkpoint=ckpt, template=template)


def saved_template(ckpt: Path, cfg: TeacherConfig, meta: dict) -> PromptTemplate:
    """The prompt template ``teacher_config.json`` records; for a teacher saved before it did,
    ``cfg.domain``'s (`IloraError` naming the checkpoint if that file is gone)."""
    if "template" in meta:
        return PromptTemplate.from_dict(meta["template"], str(ckpt / "teacher_config.json"))
    try:
        return load_template(cfg.domain)
    except ConfigError as exc:
        raise IloraError(
            f"{ckpt}: saved by an older ilora without its prompt template, and {exc} (relative paths are looked up from "
            f"the working directory {Path.cwd()}): run where the template file is, or train the teacher again"
        ) from None


def check_base_llm(ckpt: Path, name: str, llm: nn.Module, expected: str | None) -> None:
    """`IloraError` unless ``llm``, loaded from ``name``, is the base the teacher in ``ckpt`` was
    saved with (`base_weights_sample`); a warning when the checkpoint predates that record."""
    if expected is None:
        log.warning("%s: saved by an older ilora without a sample of its base LLM's weights: cannot check that %s is "
                    "the model it was trained on; save it again to record it", ckpt, name)
    elif base_weights_sample(llm) != expected:
        raise IloraError(
            f"{name}: not the base LLM the teacher in {ckpt} was trained on (its embedding rows and norm weights differ "
            "from those recorded in teacher_config.json): load the teacher with the model it was trained with"
        )


def check_parts(ckpt: Path, expected: object) -> None:
    """`IloraError` naming the first part whose fingerprint is not the one ``teacher_config.json``
    recorded: missing, changed since, or left from another save (one interrupted part-way)."""
    if not isinstance(expected, dict):
        raise IloraError(f"{ckpt / 'teacher_config.json'}: no 'parts' fingerprints (format 3 has them)")
    found = part_fingerprints(ckpt)
    for name, fingerprint in found.items():
        if expected.get(name) != fingerprint:
            state = "missing" if fingerprint is None else "not the one saved with this teacher_config.json"
            raise IloraError(
                f"{ckpt / name}: {state} (a save interrupted part-way, or a file changed since); "
                "save the teacher again, e.g. by resuming its training"
            )


def trainable_parameters(teacher: ILoRATeacher) -> dict[str, list[torch.nn.Parameter]]:
    return {
        "adapters": adapter_parameters(teacher.llm),
        "gate": list(teacher.gate_net.parameters()),
        "projector": list(teacher.projector.parameters()),
    }
