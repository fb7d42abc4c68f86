"""`python -m fastcache` and the `fastcache` console script: a small dispatcher of subcommands."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: fastcache <command> [options]

commands:
  demo       run every cache method on the embedded digit models and compare speed and quality
             (fastcache demo --help for its options)
  calibrate  measure a method's model constants (MagCache's mag_ratios, TeaCache's coefficients) on an
             embedded digit model
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if args else 2
    if args[0] == "--version":
        from fastcache import __version__

        print(__version__)
        return 0
    if args[0] == "demo":
        from fastcache.demo import main as demo_main  # imported lazily: `fastcache --help` stays instant

        return demo_main(args[1:])
    if args[0] == "calibrate":
        from fastcache.calibrate import main as calibrate_main

        return calibrate_main(args[1:])
    print(f"fastcache: error: unknown command {args[0]!r} (commands: demo, calibrate)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
