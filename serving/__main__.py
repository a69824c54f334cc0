"""`python -m serving`: what `make run` runs; `--triton-only` is `make triton`."""

from __future__ import annotations

import argparse
import sys

from serving.launcher import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    parser.add_argument(
        "--triton-only", action="store_true", help="serve the models without the proxy"
    )
    args = parser.parse_args(argv)
    return serve(with_proxy=not args.triton_only)


if __name__ == "__main__":
    sys.exit(main())
