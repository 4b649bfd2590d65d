"""Names and ids from a Hub, checked before they become paths; every path written checked to stay in the store.

    check_repo_id(repo)              huggingface_hub's own validate_repo_id rules
    check_file_name(repo, name)      a listed file name: a plain relative POSIX path (no '..', not anchored)
    check_revision(repo, rev)        a branch or tag name as refs/{rev} will hold it (refs/pr/1 is fine)
    check_commit(repo, sha)          40 lower-case hex digits, as huggingface_hub's REGEX_COMMIT_HASH
    check_hash(repo, name, h, n)     a blob id (git sha1, 40 hex) or an LFS sha256 (64 hex)
    within(root, path)               whether path, once every link in it is resolved, lies under root
    inside(root, path)               path, when within(root, path); else an error

A Hub listing (or anything at HF_ENDPOINT) is untrusted: a file named `../../x`, a commit id `../victim` or a
hash `/etc/passwd` would otherwise be joined onto the cache folder and written through.
"""

from __future__ import annotations

import ntpath
import os
import re
from pathlib import Path

from runtime.errors import MambaCliError

COMMIT_RE = re.compile(r"[0-9a-f]{40}")
HASH_RE = {40: re.compile(r"[0-9a-f]{40}"), 64: re.compile(r"[0-9a-f]{64}")}
NAME_MAX = 255  # bytes in one path segment on every common file system
PATH_MAX = 1024


class UnsafePathError(MambaCliError):
    """A name or id from a Hub, or a path in the store, would lead outside the store."""


def check_repo_id(repo: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise UnsafePathError(f"{repo!r} is not a valid Hub repo id ({e})") from None
    if "/" not in repo:
        raise UnsafePathError(f"{repo!r} is not a Hub repo id like owner/name")
    return repo


def _relative(text: str) -> str | None:
    """Why `text` is not a safe '/'-separated relative path, or None when it is."""
    if not text or len(text.encode("utf-8", "surrogatepass")) > PATH_MAX:
        return "empty or too long"
    if any(ord(c) < 32 or c == "\x7f" for c in text):
        return "contains a control character"
    if "\\" in text:
        return "contains a backslash"
    if text.startswith("/") or ntpath.splitdrive(text)[0]:
        return "is an absolute path"
    for seg in text.split("/"):
        if seg in ("", ".", ".."):
            return f"has a {seg or 'empty'!r} path segment" if seg else "has an empty path segment"
        if len(seg.encode("utf-8", "surrogatepass")) > NAME_MAX:
            return "has a path segment over 255 bytes"
    return None


def check_file_name(repo: str, name: object) -> str:
    why = _relative(name) if isinstance(name, str) else "is not a string"
    if why:
        raise UnsafePathError(f"{repo}: the Hub listing names a file {name!r} that {why}; refusing to pull it "
                              "(a hostile or broken Hub listing)")
    return name


def check_revision(repo: str, revision: str) -> str:
    why = _relative(revision)
    if why:
        raise UnsafePathError(f"{repo}: revision {revision!r} {why}; give a branch, tag or commit id")
    return revision


def check_commit(repo: str, sha: object) -> str:
    if not isinstance(sha, str) or not COMMIT_RE.fullmatch(sha):
        raise UnsafePathError(f"{repo}: the Hub answered commit id {sha!r}, not 40 hex digits; refusing to pull "
                              "(a hostile or broken Hub)")
    return sha


def check_hash(repo: str, name: str, value: object, length: int) -> str:
    if not isinstance(value, str) or not HASH_RE[length].fullmatch(value):
        kind = "sha256" if length == 64 else "git blob id"
        raise UnsafePathError(f"{repo}: the Hub listing gives {name} the {kind} {value!r}, not {length} hex "
                              "digits; refusing to pull it (a hostile or broken Hub listing)")
    return value


def within(root: Path, path: Path) -> bool:
    """Whether `path`, every link in it resolved (the last component may be missing), lies under `root`
    (resolved too)."""
    real_root = os.path.realpath(root)
    return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root


def inside(root: Path, path: Path) -> Path:
    """`path` when it stays under `root` after resolving every link (the last component may be missing)."""
    if not within(root, path):
        raise UnsafePathError(f"{path} resolves to {os.path.realpath(path)}, outside the store's "
                              f"{os.path.realpath(root)}; refusing to write there (remove the link that leads out)")
    return path
