"""Uploaded adapter archives: where they are unpacked (<data_dir>/uploads, cleared at start-up) and
how (safe extraction of an uncompressed tar: regular files only, no paths out, bounded)."""
from __future__ import annotations

import io
import logging
import shutil
import tarfile
from pathlib import Path

from manager.errors import InvalidArgumentError

MAX_UPLOAD_BYTES = 64 << 20      # payload (tar) bytes of one upload
MAX_UPLOAD_FILES = 64            # regular files in one uploaded archive


# -- safe extraction of an uploaded archive ----------------------------------------------------
def _member_parts(name: str) -> tuple[str, ...]:
    if name.startswith("/") or "\\" in name or "\x00" in name:
        raise InvalidArgumentError(f"archive member {name!r}: absolute or non-POSIX path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise InvalidArgumentError(f"archive member {name!r}: '..' in the path")
    return parts


def extract_adapter_tar(payload: bytes | bytearray, dest: Path, max_bytes: int = MAX_UPLOAD_BYTES,
                        max_files: int = MAX_UPLOAD_FILES) -> Path:
    """Extract an uncompressed tar of one adapter directory into the empty directory `dest` and
    return the adapter directory (`dest`, or the archive's single top-level folder).

    Accepted: regular files, all at the top level or all inside one top-level folder (entries for
    that folder and for "./" are allowed). Refused with InvalidArgumentError naming the member:
    absolute paths, "..", links, devices, FIFOs, sparse files, deeper nesting, mixed layouts,
    duplicate names, more than `max_files` files or `max_bytes` bytes, a compressed or damaged
    archive. Nothing outside `dest` is ever written (files are written by us, not by tarfile)."""
    try:
        tar = tarfile.open(fileobj=io.BytesIO(payload), mode="r:")
        with tar:
            members = tar.getmembers()
            files: dict[tuple[str, ...], tarfile.TarInfo] = {}
            total = 0
            for m in members:
                parts = _member_parts(m.name)
                if m.isdir():
                    if len(parts) > 1:
                        raise InvalidArgumentError(f"archive member {m.name!r}: nested folders are not accepted")
                    continue
                if not m.isreg() or m.issparse():
                    raise InvalidArgumentError(f"archive member {m.name!r}: only regular files are accepted "
                                               f"(no links, devices or FIFOs)")
                if not 1 <= len(parts) <= 2:
                    raise InvalidArgumentError(f"archive member {m.name!r}: files must be at the top level or "
                                               f"in one top-level folder")
                if parts in files:
                    raise InvalidArgumentError(f"archive member {m.name!r} appears twice")
                total += m.size
                if len(files) >= max_files or total > max_bytes:
                    raise InvalidArgumentError(f"the archive holds more than {max_files} files or {max_bytes} "
                                               f"bytes")
                files[parts] = m
            if not files:
                raise InvalidArgumentError("the archive holds no files")
            layouts = {parts[:-1] for parts in files}
            if len(layouts) != 1:
                raise InvalidArgumentError("the archive mixes top-level files and folders: put the adapter's "
                                           "files at the top level or in one folder")
            prefix = layouts.pop()
            if prefix:
                (dest / prefix[0]).mkdir()
            for parts, m in files.items():
                source = tar.extractfile(m)
                if source is None:
                    raise InvalidArgumentError(f"archive member {m.name!r} cannot be read")
                with source, open(dest.joinpath(*parts), "xb") as f:
                    shutil.copyfileobj(source, f, 1 << 20)
    except tarfile.TarError as e:
        raise InvalidArgumentError(f"the payload is not a valid uncompressed tar archive ({e})") from None
    except OSError as e:
        raise InvalidArgumentError(f"the archive cannot be extracted: {e.strerror or e}") from None
    return dest.joinpath(*prefix)


def uploads_dir(data_dir: str | Path, *, clear: bool = False) -> Path:
    """data_dir/uploads (mode 0700, created if missing), where each upload is extracted into a folder
    of its own, never the system temp directory: a tenant's files stay inside the data directory.
    With clear (once at start-up, before serving) every leftover there is removed first: a process
    killed mid-upload leaves its folder behind; the count is logged."""
    path = Path(data_dir) / "uploads"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if clear:
        path.chmod(0o700)
        leftovers = list(path.iterdir())
        for p in leftovers:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        if leftovers:
            logging.getLogger("vbert.dispatcher").warning("start-up removed %d leftover uploads from %s",
                                                          len(leftovers), path)
    return path
