"""Prompt templates: the constant text around the history and the candidates.

A template is one line of text containing ``[HistoryHere]`` once and, after it,
``[CansHere]`` once (the iLoRA/LLaRA markers). `PromptTemplate` keeps the three
constant pieces around them, stripped of surrounding whitespace:

    "<before> [HistoryHere] <between> [CansHere] <after>"

The package ships one template per domain (``music``, ``movie``, ``game``) in
``ilora/teacher/templates/<domain>.txt``. A template file may hold several lines (blank
lines and ``#`` comments are ignored); the choice rule is explicit: the caller picks a
line by ``index`` (default 0, the first). LLaRA drew a random line per batch; we use one
fixed line so runs are reproducible.

How the markers are filled (``ilora.teacher.batch`` builds the same thing as token ids):
each history item is written as ``title [HistoryEmb]``, each candidate as
``title [CansEmb]`` (``title [PH]`` for both in text-only prompts), items are separated
by ``","``, and the answer that follows the prompt is the target's title then eos. Every
piece of text stands after one space, so `PromptTemplate.render` joins the non-empty
pieces with single spaces.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ilora.errors import ConfigError, DataError, IloraError
from ilora.teacher.tiny import CANDIDATE_TOKEN, HISTORY_TOKEN, TEXT_TOKEN

HISTORY_MARK = "[HistoryHere]"
CANDIDATES_MARK = "[CansHere]"
SEPARATOR = ","
DOMAINS = ("music", "movie", "game")


@dataclass(frozen=True)
class PromptTemplate:
    """The constant pieces of one template line (each stripped; any may be empty)."""

    before: str
    between: str
    after: str

    @classmethod
    def parse(cls, line: str, source: str = "<template>") -> "PromptTemplate":
        """Split ``line`` at ``[HistoryHere]`` and ``[CansHere]`` (each exactly once, in that order)."""
        for mark in (HISTORY_MARK, CANDIDATES_MARK):
            if line.count(mark) != 1:
                raise ConfigError(f"{source}: template must contain {mark} exactly once, found {line.count(mark)}: {line!r}")
        before, rest = line.split(HISTORY_MARK)
        if CANDIDATES_MARK in before:
            raise ConfigError(f"{source}: {HISTORY_MARK} must come before {CANDIDATES_MARK}: {line!r}")
        between, after = rest.split(CANDIDATES_MARK)
        return cls(before.strip(), between.strip(), after.strip())

    @property
    def pieces(self) -> tuple[str, str, str]:
        return (self.before, self.between, self.after)

    def to_dict(self) -> dict[str, str]:
        """The pieces by name, as a teacher checkpoint records them (`from_dict` reads them back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: object, source: str) -> "PromptTemplate":
        """`to_dict`'s record; `IloraError` naming ``source`` if it is not three strings by name."""
        names = [f.name for f in dataclasses.fields(cls)]
        if not (isinstance(record, dict) and set(record) == set(names) and all(isinstance(record[n], str) for n in names)):
            raise IloraError(f"{source}: the prompt template is {record!r:.80}, expected {{'before': str, 'between': str, 'after': str}}")
        return cls(*(record[n] for n in names))

    def sha256(self) -> str:
        """Fingerprint of the pieces (16 hex digits)."""
        return hashlib.sha256(json.dumps(self.pieces).encode("utf-8")).hexdigest()[:16]

    def render(
        self,
        history_titles: Sequence[str],
        candidate_titles: Sequence[str],
        *,
        hybrid: bool = True,
        answer: str | None = None,
    ) -> str:
        """The prompt as readable text (for logs). Tokenising this text does not give the batch's
        ids: ``ilora.teacher.batch`` tokenises each segment as if after a space and writes each
        placeholder as one token with no space token before it."""
        history_mark = HISTORY_TOKEN if hybrid else TEXT_TOKEN
        candidate_mark = CANDIDATE_TOKEN if hybrid else TEXT_TOKEN
        parts = [self.before, *_items(history_titles, history_mark), self.between]
        parts += [*_items(candidate_titles, candidate_mark), self.after]
        if answer is not None:
            parts.append(answer.strip())
        return " ".join(p for p in parts if p)


def _items(titles: Sequence[str], mark: str) -> list[str]:
    out: list[str] = []
    for i, title in enumerate(titles):
        out += [title.strip(), mark] + ([SEPARATOR] if i < len(titles) - 1 else [])
    return out


def parse_template_lines(text: str, source: str) -> list[PromptTemplate]:
    """All templates of a template file's text (blank lines and ``#`` comments skipped)."""
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise DataError(source, "no template line", expected=f"a line with {HISTORY_MARK} and {CANDIDATES_MARK}")
    return [PromptTemplate.parse(line, f"{source}:{n}") for n, line in lines]


def load_templates(domain_or_path: str | Path) -> list[PromptTemplate]:
    """Templates of a packaged domain (``music``, ``movie``, ``game``) or of a template file."""
    if str(domain_or_path) in DOMAINS:
        name = f"{domain_or_path}.txt"
        text = resources.files("ilora.teacher").joinpath("templates").joinpath(name).read_text(encoding="utf-8")
        return parse_template_lines(text, f"ilora/teacher/templates/{name}")
    path = Path(domain_or_path)
    if not path.is_file():
        where = "" if path.is_absolute() else f" (a relative path is looked up from the working directory {Path.cwd()})"
        raise ConfigError(f"prompt template {str(domain_or_path)!r}: not a domain ({', '.join(DOMAINS)}) and not a file{where}")
    return parse_template_lines(path.read_text(encoding="utf-8"), str(path))


def load_template(domain_or_path: str | Path, index: int = 0) -> PromptTemplate:
    """Template line ``index`` (0-based, default the first) of a domain or template file."""
    templates = load_templates(domain_or_path)
    if not 0 <= index < len(templates):
        raise ConfigError(f"prompt template {str(domain_or_path)!r} has {len(templates)} line(s); index {index} is out of range")
    return templates[index]
