"""Where a demo writes: checked before any work, so that a run is not lost to a path it cannot write at the end."""

from __future__ import annotations

import os


def check_outputs(out_dir, names) -> None:
    """Refuse, naming it, an ``out_dir`` that is an existing file, or a file the demo writes into it (one of
    ``names``) that is an existing folder."""
    if os.path.isfile(out_dir):
        raise ValueError(f"out_dir={str(out_dir)!r} is an existing file; give a folder (new or existing)")
    for name in names:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            raise ValueError(
                f"{path!r} is a folder, where the demo writes its file {name!r}; remove it or give another folder"
            )
