"""The guides installed with the package (`isthmus docs`).

A wheel installs them as data files under `<prefix>/share/doc/isthmus`; a source checkout or
an editable install reads them from the repository's `docs/`.
"""

from __future__ import annotations

import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path


class DocsMissing(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Topic:
    name: str
    title: str
    path: Path


def candidates() -> list[Path]:
    prefixes = {sys.prefix, sysconfig.get_path("data")}
    installed = [Path(p) / "share" / "doc" / "isthmus" for p in sorted(prefixes)]
    return [*installed, Path(__file__).resolve().parent.parent / "docs"]


def docs_dir() -> Path:
    for d in candidates():
        if (d / "configuration.md").is_file():
            return d
    raise DocsMissing(
        "the guides are not installed here (looked in "
        + ", ".join(str(d) for d in candidates()) + ")"
    )


def topics() -> list[Topic]:
    d = docs_dir()
    out = []
    for path in sorted(d.glob("*.md")):
        title = next(
            (line[2:].strip() for line in path.read_text().splitlines() if line.startswith("# ")),
            path.stem,
        )
        out.append(Topic(path.stem, title, path))
    return out
