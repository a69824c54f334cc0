"""The host's pip configuration, made usable inside `podman build` and kept out of the images.

    python pip_build_config.py OUT_DIR     # prints podman build options, one a line

Where the package index is reached only through the host's pip configuration (a CA bundle, a
constraints file, local wheel folders or indexes), a build must be given it. This writes
OUT_DIR/pip.conf, the effective configuration that `pip config list` reports (files and PIP_*
variables merged), with every local file or folder it names moved under /run/host, and prints
the read-only volume options that put those paths there and OUT_DIR at /run/pip. The build
then sets PIP_CONFIG_FILE=/run/pip/pip.conf (a build argument, so no image's environment has
it); volumes are not part of any layer, so nothing of the host's configuration is in an image
(only the empty mount points under /run remain).
"""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

CONFIG_DIR = Path("/run/pip")
HOST_ROOT = Path("/run/host")
# `section.key='value'` as `pip config list` prints it; `:env:` holds the PIP_* variables.
LINE = re.compile(r"^(?P<section>[^.]+)\.(?P<key>[\w-]+)='(?P<value>.*)'$")


def effective_config() -> dict[str, dict[str, str]]:
    """Section -> key -> value, with the PIP_* variables folded into [global] over the files."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sections: dict[str, dict[str, str]] = {}
    environment: dict[str, str] = {}
    for line in listing.splitlines():
        match = LINE.match(line.strip())
        if match is None:
            continue
        section, key, value = match["section"], match["key"], match["value"]
        target = environment if section == ":env:" else sections.setdefault(section, {})
        target[key] = value
    for values in sections.values():
        for key in environment:
            values.pop(key, None)
    sections.setdefault("global", {}).update(environment)
    return sections


def local_path(token: str) -> Path | None:
    if token.startswith("file://"):
        return Path(unquote(urlparse(token).path))
    if token.startswith("/"):
        return Path(token)
    return None


def mount_root(path: Path) -> Path:
    """What to mount for `path`: a simple index's parent too (its pages link to ../../files)."""
    return path.parent if path.is_dir() and path.name == "simple" else path


def translate(sections: dict[str, dict[str, str]]) -> tuple[dict[str, dict[str, str]], set[Path]]:
    """The configuration with local paths under HOST_ROOT, and the host paths to mount."""
    mounts: set[Path] = set()
    translated: dict[str, dict[str, str]] = {}
    for section, values in sections.items():
        for key, value in values.items():
            tokens = []
            for token in value.split():
                path = local_path(token)
                if path is not None and path.exists():
                    mounts.add(mount_root(path))
                    token = token.replace(str(path), str(HOST_ROOT) + str(path), 1)
                tokens.append(token)
            translated.setdefault(section, {})[key] = " ".join(tokens)
    # A mount inside another read-only mount cannot be made: keep the outermost.
    outermost = {m for m in mounts if not any(o != m and m.is_relative_to(o) for o in mounts)}
    return translated, outermost


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections, mounts = translate(effective_config())
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_dict(sections)
    with (out / "pip.conf").open("w") as f:
        parser.write(f)
    print(f"--volume={out.resolve()}:{CONFIG_DIR}:ro")
    for path in sorted(mounts):
        print(f"--volume={path}:{HOST_ROOT}{path}:ro")
    print(f"--build-arg=PIP_CONFIG_FILE={CONFIG_DIR / 'pip.conf'}")


if __name__ == "__main__":
    main(sys.argv[1])
