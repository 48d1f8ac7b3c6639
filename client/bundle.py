"""An app bundle (Flower FAB) as the hospital sees it: its files, their hash, a review diff.

A FAB is a zip archive: the app's ``pyproject.toml`` (as Flower rewrote it),
its source files, and ``.info/CONTENT``, a manifest of the others. Nothing
here imports, installs or runs anything from a bundle: files are read as
bytes from the archive in memory.

**Bundle hash.** The SHA-256 of the text made of one line per file in the
archive, sorted by path (``.info/CONTENT`` excluded, being derived)::

    <sha256 of the file's bytes, hex>  <path>\\n

which is exactly what ``sha256sum`` prints, so a hospital can recompute it
from an unpacked bundle with standard tools::

    cd UNPACKED && find . -type f ! -path './.info/CONTENT' -printf '%P\\n' \\
        | LC_ALL=C sort | xargs -d '\\n' sha256sum | sha256sum

It depends only on the files' paths and contents, not on zip metadata or
on how the compressor compressed them, so the same code built on two
machines (with the same Flower version, which writes ``pyproject.toml``)
gets the same hash. Flower's own FAB hash (SHA-256 of the zip bytes) is
deterministic on one machine too, but changes with the zlib build.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MANIFEST = ".info/CONTENT"
"""Flower's manifest inside a FAB (derived from the other files, not hashed)."""
MAX_UNPACKED_BYTES = 200 * 2**20
"""Largest total size of a bundle's files (bytes) the hospital reads."""


class BundleError(ValueError):
    """A bundle is not a readable, well-formed FAB (the message says why)."""


@dataclass(frozen=True)
class Bundle:
    """An app bundle's identity and files.

    Attributes:
        hash: the bundle hash (see the module docstring), 64 hex digits.
        publisher: ``[tool.flwr.app] publisher`` of its pyproject.
        name: ``[project] name``.
        version: ``[project] version``.
        clientapp: the ClientApp it would load (``module:attribute``).
        files: path -> SHA-256 (hex) of every file, ``.info/CONTENT`` excluded.
    """

    hash: str
    publisher: str
    name: str
    version: str
    clientapp: str
    files: dict[str, str]

    @property
    def label(self) -> str:
        """``publisher/name version``."""
        return f"{self.publisher}/{self.name} {self.version}"

    @property
    def top_level(self) -> set[str]:
        """Top-level module and package names the bundle provides (``client``, ``faulty_app``)."""
        return {PurePosixPath(path).parts[0].removesuffix(".py") for path in self.files
                if path.endswith(".py")}


def _members(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The archive's files, checked: no duplicate, absolute or ``..`` paths, bounded size."""
    members = [info for info in archive.infolist() if not info.is_dir()]
    names = [info.filename for info in members]
    if len(set(names)) != len(names):
        raise BundleError("the bundle holds two files with the same path")
    for name in names:
        parts = PurePosixPath(name).parts
        if name.startswith("/") or ".." in parts or "\\" in name:
            raise BundleError(f"the bundle holds a file with an unsafe path: {name!r}")
    if sum(info.file_size for info in members) > MAX_UNPACKED_BYTES:
        raise BundleError(f"the bundle unpacks to more than {MAX_UNPACKED_BYTES} bytes")
    return members


def _digest(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    sha = hashlib.sha256()
    with archive.open(info) as handle:
        while chunk := handle.read(2**20):
            sha.update(chunk)
    return sha.hexdigest()


def content_hash(files: dict[str, str]) -> str:
    """The bundle hash of ``files`` (path -> SHA-256 hex), as ``sha256sum | sha256sum``."""
    lines = "".join(f"{files[path]}  {path}\n" for path in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def read_bundle(fab: bytes) -> Bundle:
    """Identify a FAB from its bytes without unpacking it to disk.

    Raises:
        BundleError: not a zip archive, unsafe or duplicate paths, no valid pyproject.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            members = _members(archive)
            files = {info.filename: _digest(archive, info) for info in members
                     if info.filename != MANIFEST}
            pyproject = archive.read("pyproject.toml") if "pyproject.toml" in files else b""
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise BundleError(f"the bundle is not a readable zip archive ({err})") from None
    try:
        config = tomllib.loads(pyproject.decode())
        app = config["tool"]["flwr"]["app"]
        return Bundle(hash=content_hash(files), publisher=str(app["publisher"]),
                      name=str(config["project"]["name"]),
                      version=str(config["project"]["version"]),
                      clientapp=str(app["components"]["clientapp"]), files=files)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError) as err:
        raise BundleError(f"the bundle's pyproject.toml is missing or incomplete ({err})"
                          ) from None


def build_from_source(source: Path) -> bytes:
    """Build the FAB of a Flower app folder exactly as ``flwr run SOURCE`` does.

    Raises:
        BundleError: the folder is not a Flower app (the message says why).
    """
    from flwr.cli.build import build_fab_from_disk  # flwr's CLI stack: import only here

    if not (source / "pyproject.toml").is_file():
        raise BundleError(f"--source {source}: no pyproject.toml; pass a MedFed checkout")
    try:
        return build_fab_from_disk(source)
    except ValueError as err:
        raise BundleError(f"--source {source}: {err}") from None


def file_text(fab: bytes, path: str) -> list[str]:
    """Lines of one file of a bundle (undecodable bytes shown as replacement characters)."""
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        return archive.read(path).decode(errors="replace").splitlines(keepends=True)


def diff(old: bytes, new: bytes, *, old_label: str, new_label: str) -> list[str]:
    """Unified diff of every file that differs between two bundles (added and removed too)."""
    before, after = read_bundle(old).files, read_bundle(new).files
    lines: list[str] = []
    for path in sorted(set(before) | set(after)):
        if before.get(path) == after.get(path):
            continue
        a = file_text(old, path) if path in before else []
        b = file_text(new, path) if path in after else []
        lines += difflib.unified_diff(a, b, fromfile=f"{old_label}/{path}",
                                      tofile=f"{new_label}/{path}")
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
    return lines
