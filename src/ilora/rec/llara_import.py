"""Import a LLaRA / iLoRA SASRec checkpoint (a whole-module ``torch.save``) without running it.

Those projects save the entire ``SASRec`` module object (classes ``__main__.SASRec``,
``SASRecModules_ori.MultiHeadAttention`` / ``PositionwiseFeedForward`` and torch's
layers) into a torch zip archive. ``torch.load`` would import and run that code. Here
the ``data.pkl`` inside is read by `ilora.data.safe_pickle.RestrictedUnpickler`:

* every module class resolves to a plain `ModuleRecord` that only collects the
  pickled ``__dict__`` (``_parameters``, ``_modules``, hyper-parameters);
* tensors are rebuilt by this file's own ``_rebuild_tensor_v2`` / ``_rebuild_parameter``
  from the raw storages in the zip (``persistent_load``), never by torch's unpickling;
* the few other globals map to harmless equivalents; anything else is refused and
  nothing executes.

The complete allow-list (`_allowed_globals`):

* module classes -> `ModuleRecord` subclasses: ``__main__.SASRec``,
  ``A_SASRec_final_bce_llm.SASRec``, ``recommender.A_SASRec_final_bce_llm.SASRec``,
  ``SASRecModules_ori.MultiHeadAttention``, ``SASRecModules_ori.PositionwiseFeedForward``,
  and from ``torch.nn.modules``: ``dropout.Dropout``, ``sparse.Embedding``,
  ``normalization.LayerNorm``, ``linear.Linear``, ``activation.Softmax``, ``conv.Conv1d``;
* ``torch._utils._rebuild_tensor_v2``, ``_rebuild_parameter`` and
  ``_rebuild_parameter_with_state`` -> this file's checked rebuilders (a view inside its
  storage and no larger than it; the copies of one load total at most a few times the
  file's size, `ilora.data.safe_pickle.ByteBudget`);
* ``torch.FloatStorage``, ``DoubleStorage``, ``HalfStorage``, ``BFloat16Storage``,
  ``LongStorage``, ``IntStorage`` -> dtype markers for ``persistent_load``;
* ``collections.OrderedDict`` (called empty, filled by checked ``SETITEMS``); ``builtins.set`` /
  ``__builtin__.set`` (plain values only); ``torch.device`` -> a
  string; ``numpy.dtype`` -> `ilora.data.safe_pickle.private_dtype`;
  ``numpy.core.multiarray.scalar`` / ``numpy._core.multiarray.scalar`` -> plain numbers only;
  ``_codecs.encode`` -> latin-1 text to bytes only.

Every archive entry must be stored uncompressed, as ``torch.save`` writes them, so no entry
inflates past the file's size.

The records are then checked (classes, hyper-parameters, every tensor's shape) and
copied into `ilora.rec.sasrec.SASRec` (one block; ``Conv1d`` kernels of size 1 become
linear weights).
"""

from __future__ import annotations

import collections
import functools
import math
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ilora.data.safe_pickle import CHECKPOINT_OPT_IN_HINT, ByteBudget, PickledDtype, RestrictedUnpickler, UnsafePickleError, atom_set, canonical_dtype, private_dtype, require_opt_in, short_repr
from ilora.errors import IloraError
from ilora.rec.sasrec import SASRec, SASRecConfig, sasrec_with_weights


class ModuleRecord:
    """The pickled state of one module, as inert data (``kind`` names the original class).

    The pickled ``__dict__`` is kept apart from the record's own attributes (`state`), so a
    key such as ``state`` cannot shadow a method; it must be a dict of string keys, and its
    ``_parameters`` / ``_modules`` dicts too.
    """

    kind: ClassVar[str] = ""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not all(type(k) is str for k in state):
            raise ValueError(f"a pickled {self.kind} whose state is {short_repr(state)}, expected a dict of attributes")
        self._state = state

    def state(self) -> dict[str, Any]:
        return getattr(self, "_state", {})

    def dict_attr(self, name: str) -> dict[str, Any]:
        value = self.state().get(name) or {}
        if not isinstance(value, dict):
            raise ValueError(f"a pickled {self.kind} whose {name} is {short_repr(value)}, expected a dict")
        return dict(value)

    def parameters(self) -> dict[str, torch.Tensor | None]:
        return self.dict_attr("_parameters")

    def children(self) -> dict[str, Any]:
        return self.dict_attr("_modules")


def _record_class(module: str, name: str) -> type[ModuleRecord]:
    return type(f"{name}Record", (ModuleRecord,), {"kind": f"{module}.{name}"})


_MODULE_CLASSES = [
    ("__main__", "SASRec"),
    ("A_SASRec_final_bce_llm", "SASRec"),
    ("recommender.A_SASRec_final_bce_llm", "SASRec"),
    ("SASRecModules_ori", "MultiHeadAttention"),
    ("SASRecModules_ori", "PositionwiseFeedForward"),
    ("torch.nn.modules.dropout", "Dropout"),
    ("torch.nn.modules.sparse", "Embedding"),
    ("torch.nn.modules.normalization", "LayerNorm"),
    ("torch.nn.modules.linear", "Linear"),
    ("torch.nn.modules.activation", "Softmax"),
    ("torch.nn.modules.conv", "Conv1d"),
]

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
}


class _StorageType:
    """Stands for ``torch.FloatStorage`` etc. in a persistent id."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor_v2(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, metadata: Any = None, *, budget: ByteBudget
) -> torch.Tensor:
    """A tensor view of a storage read from the zip, checked and copied (the copy charged to ``budget``).

    A view may not hold more elements than its storage: a zero stride would let a tiny
    file ask for a copy of any size (``torch.save`` of an ordinary parameter never writes one).
    """
    if not isinstance(storage, torch.Tensor) or storage.ndim != 1:
        raise ValueError(f"tensor rebuilt from {type(storage).__name__}, expected a storage from the archive")
    if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)):
        raise ValueError("malformed tensor record (offset/size/stride)")
    if not all(isinstance(v, int) and v >= 0 for v in (*size, *stride)) or offset < 0:
        raise ValueError("malformed tensor record (negative or non-integer size/stride)")
    if hooks:
        raise ValueError("a tensor carries backward hooks; refusing to import")
    extent = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1 if all(size) else offset
    if extent > storage.numel():
        raise ValueError(f"tensor of size {size} reaches past its storage of {storage.numel()} elements")
    elements = math.prod(size)
    if elements > storage.numel():
        raise ValueError(f"tensor of size {size} holds more elements than its storage of {storage.numel()} (overlapping strides)")
    budget.charge(elements * storage.element_size() + 256, "a tensor")  # + its own object, for many empty ones
    return storage.as_strided(size, stride, offset).clone()


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any, state: Any = None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"parameter rebuilt from {type(data).__name__}, expected a tensor")
    if hooks or state:
        raise ValueError("a parameter carries hooks or extra state; refusing to import")
    return data


def _numpy_scalar(dtype: Any, data: Any = None) -> int | float | bool:
    """NumPy's ``scalar(dtype, bytes)`` for plain numeric dtypes only, returned as a Python number."""
    dtype = canonical_dtype(dtype)
    if dtype.kind not in "biuf" or not isinstance(data, bytes):
        raise ValueError(f"refused a NumPy scalar of dtype {dtype!r} (only plain numbers are accepted)")
    if len(data) != dtype.itemsize:
        raise ValueError("malformed NumPy scalar")
    return np.frombuffer(data, dtype=dtype)[0].item()


def _latin1_encode(text: Any, encoding: Any = "utf-8", *, budget: ByteBudget) -> bytes:
    """``_codecs.encode(text, "latin1")``, the copy charged to ``budget`` (a memoised string
    encoded again and again would otherwise become a new copy each time)."""
    if not isinstance(text, str) or encoding != "latin1":
        raise ValueError("refused a _codecs.encode call other than latin1 text (how pickles carry raw bytes)")
    budget.charge(len(text), "encoded bytes")
    return text.encode("latin1")


def _ordered_dict(items: Any = ()) -> collections.OrderedDict:
    """``collections.OrderedDict`` as torch pickles it: called empty, then filled by ``SETITEMS``
    (whose keys the unpickler checks); never from an iterable of pairs it would hash unchecked."""
    if items != ():
        raise ValueError("refused an OrderedDict(...) call with items")
    return collections.OrderedDict()


def _device(kind: Any, index: Any = None) -> str:
    """``torch.device(kind, index)`` as a string; a name and an optional integer index only."""
    if type(kind) is not str or len(kind) > 16 or not (index is None or type(index) is int):
        raise ValueError(f"refused torch.device({short_repr(kind)}, {short_repr(index)})")
    return kind if index is None else f"{kind}:{index}"


def _allowed_globals(budget: ByteBudget | None = None) -> dict[tuple[str, str], Any]:
    """The allow-list of one load; tensor copies are charged to ``budget``."""
    budget = budget or ByteBudget.for_file(0)
    rebuild_tensor = functools.partial(_rebuild_tensor_v2, budget=budget)
    bounded_set = functools.partial(atom_set, budget=budget)
    allowed: dict[tuple[str, str], Any] = {key: _record_class(*key) for key in _MODULE_CLASSES}
    allowed.update(
        {
            ("collections", "OrderedDict"): _ordered_dict,
            ("__builtin__", "set"): bounded_set,
            ("builtins", "set"): bounded_set,
            ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
            ("torch", "device"): _device,
            ("numpy", "dtype"): private_dtype,
            ("numpy.core.multiarray", "scalar"): _numpy_scalar,
            ("numpy._core.multiarray", "scalar"): _numpy_scalar,
            ("_codecs", "encode"): functools.partial(_latin1_encode, budget=budget),
        }
    )
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(dtype)
    return allowed


def read_module_pickle(path: str | Path, *, allow_pickle: bool) -> ModuleRecord:
    """The root `ModuleRecord` of a whole-module torch zip checkpoint, read without running it."""
    path = Path(path)
    require_opt_in(path, allow_pickle, CHECKPOINT_OPT_IN_HINT)
    if not path.is_file():
        raise IloraError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):
        raise IloraError(f"{path}: not a torch zip checkpoint (legacy torch.save formats are not supported)")
    try:
        root = _read_archive(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError, NotImplementedError, EOFError, ValueError, KeyError) as exc:
        # a damaged or odd archive (bad directory, encrypted or unsupported entry): bad input
        raise IloraError(f"{path}: not a readable torch zip checkpoint ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    if not isinstance(root, ModuleRecord) or not root.kind.endswith(".SASRec"):
        raise IloraError(f"{path}: the checkpoint holds {type(root).__name__}, expected a pickled SASRec module")
    return root


def _read_archive(path: Path) -> Any:
    """The unpickled ``data.pkl`` of the torch zip checkpoint at ``path`` (`read_module_pickle`)."""
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise IloraError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
        compressed = [info.filename for info in archive.infolist() if info.compress_type != zipfile.ZIP_STORED]
        if compressed:  # a compressed entry could inflate far past the file's size
            raise IloraError(f"{path}: compressed archive entry {compressed[0]!r} (torch.save writes every entry uncompressed)")
        odd = [info.filename for info in archive.infolist() if info.file_size != info.compress_size]
        if odd:  # a stored entry is its bytes: a larger stated size is a lie the budgets would trust
            raise IloraError(f"{path}: archive entry {odd[0]!r} states a size other than the bytes it stores")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in names and archive.read(byteorder).strip() != b"little":
            raise IloraError(f"{path}: big-endian checkpoints are not supported")
        storages: dict[str, torch.Tensor] = {}
        budget = ByteBudget.for_file(path.stat().st_size)  # storages read and tensors copied

        def persistent_load(pid: Any) -> torch.Tensor:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
                raise IloraError(f"{path}: unexpected persistent id {short_repr(pid)}")
            _tag, stype, key, _location, numel = pid
            if type(key) is not str or type(numel) is not int:
                raise IloraError(f"{path}: unexpected persistent id {short_repr(pid)}")
            if key not in storages:
                entry = f"{prefix}data/{key}"
                if entry not in names:
                    raise IloraError(f"{path}: storage {key!r} is missing from the archive")
                try:  # an entry overlapping others could make the archive's bytes count many times over
                    budget.charge(archive.getinfo(entry).file_size, "a storage")
                except ValueError as exc:
                    raise IloraError(f"{path}: {exc}") from None
                raw = archive.read(entry)
                itemsize = torch.empty(0, dtype=stype.dtype).element_size()
                if len(raw) != int(numel) * itemsize:
                    raise IloraError(f"{path}: storage {key!r} holds {len(raw)} bytes, expected {numel} x {itemsize}")
                storages[key] = torch.frombuffer(bytearray(raw), dtype=stype.dtype) if raw else torch.empty(0, dtype=stype.dtype)
            return storages[key]

        with archive.open(pickles[0]) as fh:
            unpickler = RestrictedUnpickler(
                fh, _allowed_globals(budget), path, size=path.stat().st_size,
                buildable=(ModuleRecord, PickledDtype), persistent_load=persistent_load,
            )
            try:
                return unpickler.load()
            except (UnsafePickleError, IloraError):
                raise
            except Exception as exc:  # malformed pickle stream: report it as bad input
                raise IloraError(f"{path}: not a readable module pickle ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None


_EXPECTED_CHILDREN = {
    "dropout", "item_embeddings", "positional_embeddings", "emb_dropout",
    "ln_1", "ln_2", "ln_3", "mh_attn", "feed_forward", "s_fc",
}  # fmt: skip


def _same(value: Any, expected: Any) -> bool:
    """``value == expected`` for a pickled value, types first: comparing a tensor (or an
    array) would not give a bool. An int stands for an equal float."""
    if isinstance(expected, tuple):
        return type(value) is tuple and len(value) == len(expected) and all(_same(v, e) for v, e in zip(value, expected))
    if isinstance(expected, float) and type(value) in (int, float):
        return value == expected
    return type(value) is type(expected) and value == expected


class _Checker:
    """Walks the records, checking classes and hyper-parameters, and collects our state dict."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tensors: dict[str, torch.Tensor] = {}

    def fail(self, where: str, problem: str) -> None:
        raise IloraError(f"{self.path}: {where}: {problem}")

    def module(self, rec: Any, where: str, kind: str) -> ModuleRecord:
        if not isinstance(rec, ModuleRecord) or not rec.kind.endswith("." + kind):
            self.fail(where, f"expected a {kind} module, found {getattr(rec, 'kind', type(rec).__name__)}")
        if rec.dict_attr("_buffers"):
            self.fail(where, f"unexpected buffers {sorted(rec.dict_attr('_buffers'))}")
        return rec

    def attr(self, rec: ModuleRecord, where: str, name: str, expected: Any) -> None:
        value = rec.state().get(name, "<missing>")
        if isinstance(expected, tuple) and isinstance(value, list):
            value = tuple(value)
        if not _same(value, expected):
            self.fail(where, f"{name}={short_repr(value)}, expected {expected!r}")

    def params(self, rec: ModuleRecord, where: str, mapping: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        params = rec.parameters()
        if set(params) != set(mapping):
            self.fail(where, f"parameters {sorted(params)}, expected {sorted(mapping)}")
        for name, (ours, shape) in mapping.items():
            tensor = params[name]
            if not isinstance(tensor, torch.Tensor):
                self.fail(f"{where}.{name}", "missing tensor")
            assert isinstance(tensor, torch.Tensor)
            if tuple(tensor.shape) != shape:
                self.fail(f"{where}.{name}", f"shape {tuple(tensor.shape)}, expected {shape}")
            if not tensor.is_floating_point():
                self.fail(f"{where}.{name}", f"dtype {tensor.dtype}, expected floating point")
            self.tensors[ours] = tensor.to(torch.float32).reshape(shape[:2] if len(shape) == 3 else shape)

    def layer_norm(self, rec: Any, where: str, ours: str, hidden: int, eps: float) -> None:
        rec = self.module(rec, where, "LayerNorm")
        self.attr(rec, where, "normalized_shape", (hidden,))
        self.attr(rec, where, "eps", eps)
        self.attr(rec, where, "elementwise_affine", True)
        self.params(rec, where, {"weight": (f"{ours}.weight", (hidden,)), "bias": (f"{ours}.bias", (hidden,))})

    def linear(self, rec: Any, where: str, ours: str, n_in: int, n_out: int) -> None:
        rec = self.module(rec, where, "Linear")
        self.attr(rec, where, "in_features", n_in)
        self.attr(rec, where, "out_features", n_out)
        self.params(rec, where, {"weight": (f"{ours}.weight", (n_out, n_in)), "bias": (f"{ours}.bias", (n_out,))})

    def conv1x1(self, rec: Any, where: str, ours: str, hidden: int) -> None:
        rec = self.module(rec, where, "Conv1d")
        for name, value in [
            ("in_channels", hidden), ("out_channels", hidden), ("kernel_size", (1,)), ("stride", (1,)),
            ("padding", (0,)), ("dilation", (1,)), ("groups", 1), ("padding_mode", "zeros"),
        ]:  # fmt: skip
            self.attr(rec, where, name, value)
        self.params(rec, where, {"weight": (f"{ours}.weight", (hidden, hidden, 1)), "bias": (f"{ours}.bias", (hidden,))})

    def embedding(self, rec: Any, where: str, ours: str, rows: int, hidden: int) -> None:
        rec = self.module(rec, where, "Embedding")
        self.attr(rec, where, "num_embeddings", rows)
        self.attr(rec, where, "embedding_dim", hidden)
        self.attr(rec, where, "max_norm", None)
        self.params(rec, where, {"weight": (f"{ours}.weight", (rows, hidden))})

    def dropout_p(self, rec: Any, where: str) -> float:
        rec = self.module(rec, where, "Dropout")
        p = rec.state().get("p")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:  # nn.Dropout(0) keeps the int 0
            self.fail(where, f"dropout p={short_repr(p)}, expected a number in [0, 1)")
        return float(p)  # type: ignore[arg-type]


def _int_attr(check: _Checker, rec: ModuleRecord, where: str, name: str) -> int:
    value = rec.state().get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        check.fail(where, f"{name}={short_repr(value)}, expected a positive integer")
    return int(value)  # type: ignore[arg-type]


def convert_record(root: ModuleRecord, path: str | Path) -> tuple[SASRecConfig, dict[str, torch.Tensor]]:
    """Our config and state dict from a checked LLaRA SASRec record."""
    check = _Checker(Path(path))
    check.module(root, "SASRec", "SASRec")  # its own buffers too (an item bias, say), not only its children's
    children = root.children()
    if set(children) != _EXPECTED_CHILDREN:
        extra, missing = sorted(set(children) - _EXPECTED_CHILDREN), sorted(_EXPECTED_CHILDREN - set(children))
        check.fail("SASRec", f"unexpected submodules {extra}, missing {missing}")
    if root.parameters():
        check.fail("SASRec", f"unexpected direct parameters {sorted(root.parameters())}")
    num_items = _int_attr(check, root, "SASRec", "item_num")
    max_len = _int_attr(check, root, "SASRec", "state_size")
    hidden = _int_attr(check, root, "SASRec", "hidden_size")
    attn = check.module(children["mh_attn"], "mh_attn", "MultiHeadAttention")
    heads = _int_attr(check, attn, "mh_attn", "num_heads")
    check.attr(attn, "mh_attn", "hidden_size", hidden)
    eps = children["ln_1"].state().get("eps") if isinstance(children["ln_1"], ModuleRecord) else None
    if not isinstance(eps, float) or eps <= 0:
        check.fail("ln_1", f"eps={short_repr(eps)}")
    dropout = check.dropout_p(children["emb_dropout"], "emb_dropout")
    check.dropout_p(children["dropout"], "dropout")
    try:
        cfg = SASRecConfig(num_items=num_items, max_len=max_len, hidden=hidden, heads=heads, blocks=1, dropout=dropout, layer_norm_eps=eps)  # type: ignore[arg-type]
    except IloraError as exc:  # heads not dividing hidden, a state_size past the bound: name the checkpoint
        check.fail("SASRec", str(exc))

    check.embedding(children["item_embeddings"], "item_embeddings", "item_emb", num_items + 1, hidden)
    check.embedding(children["positional_embeddings"], "positional_embeddings", "pos_emb", max_len, hidden)
    check.layer_norm(children["ln_1"], "ln_1", "blocks.0.attn_norm", hidden, cfg.layer_norm_eps)
    check.layer_norm(children["ln_2"], "ln_2", "blocks.0.ffn_norm", hidden, cfg.layer_norm_eps)
    check.layer_norm(children["ln_3"], "ln_3", "final_norm", hidden, cfg.layer_norm_eps)
    attn_children = attn.children()
    if set(attn_children) != {"linear_q", "linear_k", "linear_v", "dropout", "softmax"}:
        check.fail("mh_attn", f"submodules {sorted(attn_children)}")
    for ref, ours in (("linear_q", "q"), ("linear_k", "k"), ("linear_v", "v")):
        check.linear(attn_children[ref], f"mh_attn.{ref}", f"blocks.0.attn.{ours}", hidden, hidden)
    check.dropout_p(attn_children["dropout"], "mh_attn.dropout")
    softmax = check.module(attn_children["softmax"], "mh_attn.softmax", "Softmax")
    check.attr(softmax, "mh_attn.softmax", "dim", -1)
    ffn = check.module(children["feed_forward"], "feed_forward", "PositionwiseFeedForward")
    ffn_children = ffn.children()
    if set(ffn_children) != {"w_1", "w_2", "layer_norm", "dropout"}:
        check.fail("feed_forward", f"submodules {sorted(ffn_children)}")
    check.conv1x1(ffn_children["w_1"], "feed_forward.w_1", "blocks.0.ffn.w_1", hidden)
    check.conv1x1(ffn_children["w_2"], "feed_forward.w_2", "blocks.0.ffn.w_2", hidden)
    check.layer_norm(ffn_children["layer_norm"], "feed_forward.layer_norm", "blocks.0.ffn.out_norm", hidden, cfg.layer_norm_eps)
    check.dropout_p(ffn_children["dropout"], "feed_forward.dropout")
    check.linear(children["s_fc"], "s_fc", "output", hidden, num_items)
    return cfg, check.tensors


def import_llara_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> SASRec:
    """A `SASRec` (eval mode, CPU) with the weights of a LLaRA/iLoRA whole-module checkpoint."""
    root = read_module_pickle(path, allow_pickle=allow_pickle)
    try:
        cfg, tensors = convert_record(root, path)
    except (TypeError, ValueError, RuntimeError) as exc:  # records holding what no torch.save of a SASRec writes
        raise IloraError(f"{path}: not a LLaRA SASRec checkpoint this importer reads ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
    return sasrec_with_weights(cfg, tensors, path).eval()
