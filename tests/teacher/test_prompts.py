"""Prompt templates: packaged files, parsing, the readable rendering."""

from __future__ import annotations

import re

import pytest

from ilora.errors import ConfigError
from ilora.teacher.prompts import DOMAINS, PromptTemplate, load_template, load_templates


@pytest.mark.parametrize("domain", DOMAINS)
def test_packaged_templates(domain):
    templates = load_templates(domain)
    assert len(templates) >= 1
    t = load_template(domain)
    assert t == templates[0]
    for piece in (t.before, t.between):
        assert piece and "[" not in piece and piece == piece.strip()
    assert t.after


def test_parse_pieces():
    t = PromptTemplate.parse("  Heard [HistoryHere] then. Pick from [CansHere]. Answer:  ")
    assert t.pieces == ("Heard", "then. Pick from", ". Answer:")
    assert PromptTemplate.parse("[HistoryHere][CansHere]").pieces == ("", "", "")


@pytest.mark.parametrize(
    "line",
    ["no markers", "[HistoryHere] only", "[CansHere] before [HistoryHere]", "[HistoryHere] [HistoryHere] [CansHere]", "[HistoryHere] [CansHere] [CansHere]"],
)
def test_parse_rejects(line):
    with pytest.raises(ConfigError):
        PromptTemplate.parse(line)


def test_template_file_lines_and_choice(tmp_path, monkeypatch):
    path = tmp_path / "mine.txt"
    path.write_text("# comment\n\nA [HistoryHere] B [CansHere] C\n  \nD [HistoryHere] E [CansHere] F\n", encoding="utf-8")
    assert [t.before for t in load_templates(path)] == ["A", "D"]
    assert load_template(path, 1).pieces == ("D", "E", "F")
    with pytest.raises(ConfigError, match="index 2"):
        load_template(path, 2)
    with pytest.raises(ConfigError, match=r"not a domain \(music, movie, game\) and not a file$"):
        load_template(tmp_path / "absent.txt")
    monkeypatch.chdir(tmp_path / "..")  # a relative path: the error says where it was looked up
    with pytest.raises(ConfigError, match=f"and not a file \\(a relative path is looked up from the working directory {re.escape(str(tmp_path.parent))}\\)"):
        load_template("mine.txt")
    (tmp_path / "bad.txt").write_text("A [HistoryHere] B\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.txt:1"):
        load_templates(tmp_path / "bad.txt")


def test_render_matches_fstring():
    t = PromptTemplate.parse("Heard [HistoryHere] in order. Pick one of [CansHere] now. It is")
    hist, cans = ["Enigma", " Café Del Mar "], ["AC/DC", "Enigma", "Moby"]
    h = " , ".join(f"{x.strip()} [HistoryEmb]" for x in hist)
    c = " , ".join(f"{x} [CansEmb]" for x in cans)
    assert t.render(hist, cans) == f"Heard {h} in order. Pick one of {c} now. It is"
    text_only = t.render(hist, cans, hybrid=False, answer="Moby")
    assert text_only == "Heard Enigma [PH] , Café Del Mar [PH] in order. Pick one of AC/DC [PH] , Enigma [PH] , Moby [PH] now. It is Moby"
