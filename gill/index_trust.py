"""Where an index directory may read images from: the signature of the source folders a user's own build
recorded (``sign_source_roots``, ``source_roots_signed``) and the error for a hit outside them.

An index records local images as paths; a shared index is data from someone else, and its metadata (or
its manifest) could name any file: ``../../etc/passwd``, ``/home/you/private.jpg``. So a hit's local
image is read only from inside the index directory, or from a folder the build recorded in the
manifest's ``source_roots`` *and* signed with this user's key (an HMAC with a random key kept in
``~/.config/gill/index-key``, or the file ``$GILL_INDEX_KEY_FILE``): an index this user built from their
own folders reads them, an index from elsewhere reads only what it carries. ``allow_outside=True``
or ``source_roots=[...]`` (folders the caller trusts) open it up.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from gill.index_format import IndexManifest

KEY_FILE_ENV = "GILL_INDEX_KEY_FILE"


class SourceOutsideError(ValueError):
    """A hit's local source lies outside the folders an index may read images from."""


def _key_file() -> Path:
    if os.environ.get(KEY_FILE_ENV):
        return Path(os.environ[KEY_FILE_ENV])
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "gill" / "index-key"


def _read_key(create: bool = False) -> bytes | None:
    """This user's signing key (32 random bytes, mode 0600); None where there is none and it cannot be made."""
    import secrets

    from gill.io import unique_temp_name

    path = _key_file()
    try:
        key = path.read_bytes()
        return key if len(key) >= 32 else None
    except FileNotFoundError:
        if not create:
            return None
    except OSError:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = unique_temp_name(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # a secret: not the umask's mode
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # never replaces a key another process made meanwhile
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links
            if not path.exists():
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        key = path.read_bytes()
        return key if len(key) >= 32 else None
    except OSError:
        return None


def _roots_mac(key: bytes, roots: Sequence[str]) -> str:
    import hmac

    return hmac.new(key, json.dumps(sorted(roots)).encode("utf-8"), "sha256").hexdigest()


def sign_source_roots(roots: Sequence[str]) -> str:
    """The signature a build stores beside its ``source_roots`` ("" for none, or where no key can be kept)."""
    if not roots:
        return ""
    key = _read_key(create=True)
    return _roots_mac(key, roots) if key is not None else ""


def source_roots_signed(manifest: IndexManifest) -> bool:
    """Whether this user's key signed the manifest's ``source_roots`` (so this user's build recorded them)."""
    import hmac

    if not manifest.source_roots or not manifest.roots_signature:
        return False
    key = _read_key()
    return key is not None and hmac.compare_digest(_roots_mac(key, manifest.source_roots), manifest.roots_signature)

