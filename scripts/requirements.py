"""Print the pinned requirements of pyproject extras, one a line, for `pip install -r`.

    python3 requirements.py PYPROJECT EXTRA...

The Dockerfiles install their dependencies from this list instead of `pip install ./[extra]`,
which needs the whole project (README.md included) in the layer: made in a stage of its own,
the list is all the dependency layers depend on, so an edit of anything else (another extra,
the code, the README) does not re-install torch.
The project's own `dependencies` come first, then each extra's, without repeats.
"""

from __future__ import annotations

import sys
import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    lines = list(project.get("dependencies", []))
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return list(dict.fromkeys(lines))


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1], sys.argv[2:])))
