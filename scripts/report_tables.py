"""Old spelling of ``python -m common.cli.report`` (the readings of finished result folders), kept
so that existing commands keep working; errors exit with status 1 as before.

    python scripts/report_tables.py FOLDER ...                  = report tables FOLDER ...
    python scripts/report_tables.py --search-vs-grid S G        = report search-vs-grid S G
    python scripts/report_tables.py --item-estimate G [0.05]    = report item-estimate G [0.05]
    python scripts/report_tables.py --models A B                = report models A B
    python scripts/report_tables.py --cell-time A B             = report cell-time A B
    python scripts/report_tables.py --flips G [0.45]            = report flips G [0.45]
    python scripts/report_tables.py --replicates G OTHER ...    = report replicates G OTHER ...
    python scripts/report_tables.py --leave-out COUNT G ...     = report leave-out COUNT G ...
"""

from __future__ import annotations

import sys

from common.cli.flags import USER_ERRORS
from common.cli.report import build_parser, run

FLAGS = ("--search-vs-grid", "--item-estimate", "--models", "--cell-time", "--flips", "--replicates", "--leave-out")


def main(argv: list[str]) -> None:
    flag = argv[0] if argv and argv[0] in FLAGS else None
    args = build_parser().parse_args([flag[2:], *argv[1:]] if flag else ["tables", *argv])
    try:
        run(args, label=flag or "")
    except USER_ERRORS as error:
        hint = "" if flag else f", or start with {', '.join(FLAGS)}"
        raise SystemExit(f"error: {error.args[0] if error.args else type(error).__name__}{hint}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
