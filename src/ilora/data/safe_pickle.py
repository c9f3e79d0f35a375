"""Restricted unpickling for legacy files (pandas ``.df`` DataFrames, LLaRA SASRec checkpoints).

Pickles can run arbitrary code. This project never unpickles anything unless the user
opted in (``--allow-pickle`` / ``allow_pickle=True``), and even then only through
`RestrictedUnpickler`, which resolves a global only if it is in an explicit allow-list
(module, name) -> object. Anything else is refused with an `UnsafePickleError` that
names the file and the refused global; nothing from the file runs.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from ilora.errors import IloraError

PICKLE_OPT_IN_HINT = (
    "pickles can execute code; pass --allow-pickle (allow_pickle=True) to read it with a restricted "
    "unpickler, or convert it once with `ilora data convert SRC DST --allow-pickle`"
)


class UnsafePickleError(IloraError):
    """A pickle referenced a global outside the allow-list, or opt-in was missing."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only resolves globals from ``allowed``.

    Args:
        file: the open binary stream.
        allowed: mapping ``(module, name) -> object`` of the only globals the file may use.
        path: the file's name, for error messages.
        persistent_load: optional handler for persistent ids (torch zip checkpoints).
    """

    def __init__(
        self,
        file: BinaryIO,
        allowed: Mapping[tuple[str, str], Any],
        path: str | Path,
        persistent_load: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__(file)
        self._allowed = allowed
        self._path = str(path)
        if persistent_load is not None:
            self.persistent_load = persistent_load  # type: ignore[assignment]

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._path}: refused to load global {module}.{name} "
                "(not in the allow-list of data classes; nothing from the file was executed)"
            ) from None


def require_opt_in(path: str | Path, allow_pickle: bool) -> None:
    """Raise a clear error unless the user explicitly allowed pickles."""
    if not allow_pickle:
        raise UnsafePickleError(f"{path}: is a pickle; {PICKLE_OPT_IN_HINT}")


def restricted_loads(data: bytes, allowed: Mapping[tuple[str, str], Any], path: str | Path) -> Any:
    """Unpickle ``data`` with only the ``allowed`` globals resolvable."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), allowed, path).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise IloraError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
