"""The old name of ``gill.io`` (public now): kept so that older callers keep working."""

from gill.io import (  # noqa: F401
    MAX_CAPTION_BYTES,
    MAX_FILE_BYTES,
    FileTooLarge,
    NotRegularFile,
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    file_kind,
    inside,
    read_regular_file,
    unique_temp_name,
)
