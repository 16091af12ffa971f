"""Find pretrained weight files offline: explicit path, $DCAE15_WEIGHTS, then the torch hub cache."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MissingWeightsError", "find_weights", "search_dirs"]


class MissingWeightsError(FileNotFoundError):
    """A pretrained weight file is not on this machine; the message says which file and where to put it."""


def search_dirs() -> list[Path]:
    """Directories searched for weight files, in order."""
    dirs: list[Path] = []
    if os.environ.get("DCAE15_WEIGHTS"):
        dirs.append(Path(os.environ["DCAE15_WEIGHTS"]).expanduser())
    torch_home = Path(os.environ.get("TORCH_HOME", Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "torch"))
    dirs.append(torch_home.expanduser() / "hub" / "checkpoints")
    return dirs


def find_weights(filename: str, explicit: str | os.PathLike | None = None, what: str = "weights") -> Path:
    """Return the path of ``filename`` without downloading anything.

    Args:
        filename: the file name the upstream library expects (e.g. ``vgg16-397923af.pth``).
        explicit: a path given by the user (config / argument); if set it must exist.
        what: a human description used in the error ("LPIPS VGG16 backbone").

    Raises:
        MissingWeightsError: naming the file and every place that was searched.
    """
    if explicit:
        p = Path(explicit).expanduser()
        if p.is_dir():
            p = p / filename
        if p.is_file():
            return p
        raise MissingWeightsError(f"{what}: the file {p} given explicitly does not exist. Copy {filename} there or fix the path.")
    for d in search_dirs():
        if (d / filename).is_file():
            return d / filename
    places = ", ".join(str(d) for d in search_dirs())
    raise MissingWeightsError(
        f"{what}: weight file '{filename}' not found (searched: {places}). This machine cannot download it: "
        f"copy {filename} into $DCAE15_WEIGHTS or $TORCH_HOME/hub/checkpoints, or pass its path explicitly."
    )
