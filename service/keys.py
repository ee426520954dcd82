"""API keys: the key-file format, SHA-256 key hashes, constant-time lookup, and reload on change.

A key file holds one key per line (``#`` starts a comment line; blank lines are skipped)::

    [name:]secret
    secret := sha256:<64 hex digits>   the SHA-256 of the key (what ``python -m service.keys hash`` prints)
            | <the key itself>         at least 16 characters, no whitespace, ':' or ','
    name   := letters, digits, '_', '.', '-' (at most 64): names the client in the per-key request counter

The service keeps only SHA-256 digests in memory; a presented key is hashed and compared with every digest
by ``hmac.compare_digest`` (no early exit), so neither the timing nor any message tells which keys exist.
SHA-256 without salt or stretching suits keys drawn at random (``generate`` draws 256 bits); it would not
suit passwords a person chose.

    python -m service.keys generate [NAME]   # a new random key on stderr, its file line on stdout
    python -m service.keys hash [NAME]       # reads a key from stdin (or a prompt), prints its file line
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import hmac
import logging
import re
import secrets
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

HASH_PREFIX = "sha256:"
MIN_KEY_LENGTH = 16  # shorter plain keys are refused: guessable within a scan
MAX_KEY_LENGTH = 4096  # a presented key longer than this is refused before hashing
_HASH = re.compile(rf"{HASH_PREFIX}([0-9a-fA-F]{{64}})")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PLAIN_KEY = re.compile(rf"[^\s:,]{{{MIN_KEY_LENGTH},{MAX_KEY_LENGTH}}}")


class KeyFileError(ValueError):
    """A key line that does not parse; the message names the line number, never its text (it may hold a key)."""


@dataclass(frozen=True)
class ApiKey:
    """One accepted key: the SHA-256 digest of its bytes (32 bytes) and the client's name, if given."""

    digest: bytes
    name: str | None = None


def digest(key: str) -> bytes:
    """The SHA-256 digest of a key as it arrives in a header (UTF-8 bytes)."""
    return hashlib.sha256(key.encode()).digest()


def hash_line(key: str, name: str | None = None) -> str:
    """The key-file line that accepts ``key``, without the key itself in it."""
    if name is not None and not _NAME.fullmatch(name):
        raise KeyFileError(f"a key name is 1-64 letters, digits, '_', '.' or '-', got {name!r}")
    line = f"{HASH_PREFIX}{digest(key).hex()}"
    return f"{name}:{line}" if name else line


def parse_line(line: str, where: str) -> ApiKey | None:
    """The key on one line of a key file or of the ``api_keys`` setting; None for blank and comment lines.

    ``where`` (e.g. "keys.txt line 3") goes into the error message in place of the line's text."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    name = None
    if not line.startswith(HASH_PREFIX) and ":" in line:
        name, line = line.split(":", 1)
        if not _NAME.fullmatch(name):
            raise KeyFileError(f"{where}: the name before ':' must be 1-64 letters, digits, '_', '.' or '-'")
    if line.startswith(HASH_PREFIX):
        match = _HASH.fullmatch(line)
        if match is None:
            raise KeyFileError(f"{where}: a hash is 'sha256:' and 64 hex digits")
        return ApiKey(bytes.fromhex(match[1]), name)
    if not _PLAIN_KEY.fullmatch(line):
        raise KeyFileError(
            f"{where}: a plain key needs at least {MIN_KEY_LENGTH} characters without whitespace, ':' or ','"
        )
    return ApiKey(digest(line), name)


def parse_lines(lines: Iterable[str], source: str) -> list[ApiKey]:
    """Every key in ``lines``; raises KeyFileError at the first bad line."""
    keys = [parse_line(line, f"{source} line {number}") for number, line in enumerate(lines, 1)]
    return [key for key in keys if key is not None]


class KeyStore:
    """The accepted keys: fixed ones (from the environment) plus those of a key file, re-read when the file
    changes (its mtime, size or inode; checked on every lookup: one ``stat``) or on ``reload()`` (SIGHUP).

    A reload that fails (file missing, unreadable or with a bad line) keeps the previous keys and logs one
    error per state of the file: a half-written or deleted file never opens the service. The first load
    raises instead, so that a service with a broken key file does not start."""

    def __init__(self, fixed: list[ApiKey], path: Path | None) -> None:
        self.fixed = fixed
        self.path = path
        self._file_keys: list[ApiKey] = []
        self._seen: tuple[int, int, int] | None = None  # the file's signature when last read (or tried)
        if path is not None:
            try:
                self._seen = self._signature(path)
                self._file_keys = parse_lines(path.read_text(encoding="utf-8").splitlines(), str(path))
            except (OSError, UnicodeDecodeError) as error:
                raise KeyFileError(f"cannot read the API key file {path}: {error}") from None

    @staticmethod
    def _signature(path: Path) -> tuple[int, int, int]:
        stat = path.stat()  # follows symlinks: a Kubernetes Secret volume swaps a symlink on update
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def reload(self, *, force: bool = True) -> None:
        """Re-read the key file: always if ``force``, else only when its signature changed since the last try."""
        if self.path is None:
            return
        try:
            signature = self._signature(self.path)
        except OSError as error:
            if force or self._seen is not None:
                log.error("API key file not reloaded, keeping the %d keys read before: %s", len(self._file_keys), error)
            self._seen = None
            return
        if signature == self._seen and not force:
            return
        self._seen = signature
        try:
            keys = parse_lines(self.path.read_text(encoding="utf-8").splitlines(), str(self.path))
        except (OSError, UnicodeDecodeError, KeyFileError) as error:
            log.error("API key file not reloaded, keeping the %d keys read before: %s", len(self._file_keys), error)
            return
        self._file_keys = keys
        log.info("API keys reloaded: %d from %s", len(keys), self.path)

    @property
    def keys(self) -> list[ApiKey]:
        return [*self.fixed, *self._file_keys]

    @property
    def names(self) -> set[str]:
        return {key.name for key in self.keys if key.name is not None}

    def match(self, presented: str) -> ApiKey | None:
        """The accepted key equal to ``presented``, or None; compares with every key, in constant time each."""
        self.reload(force=False)
        if len(presented) > MAX_KEY_LENGTH:
            return None
        candidate, found = digest(presented), None
        for key in self.keys:
            if hmac.compare_digest(candidate, key.digest) and found is None:
                found = key
        return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.keys", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser(
        "generate", help="draw a new random key: the key on stderr (give it to the client), its line on stdout"
    )
    generate.add_argument("name", nargs="?", help="the client's name, for the per-key request counter")
    hashed = commands.add_parser(
        "hash", help="read a key from stdin (or a prompt on a terminal) and print its key-file line"
    )
    hashed.add_argument("name", nargs="?", help="the client's name, for the per-key request counter")
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            key = secrets.token_urlsafe(32)
            print(key, file=sys.stderr)
        else:
            key = getpass.getpass("key: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
            if not _PLAIN_KEY.fullmatch(key):
                print(
                    f"error: a key needs at least {MIN_KEY_LENGTH} characters without whitespace, ':' or ','",
                    file=sys.stderr,
                )
                return 2
        print(hash_line(key, args.name))
    except KeyFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
