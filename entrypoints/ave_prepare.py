"""Entry point `ave_prepare`: decode AVE/<id>.mp4 once into frames/<id>/<sec>.jpg and audio/<id>.wav (16 kHz mono).

python entrypoints/ave_prepare.py --data_dir /data/AVE_Dataset                  # writes next to AVE/
python entrypoints/ave_prepare.py --data_dir /data/AVE_Dataset --out_dir /scratch/ave_extracted

Resumable: run it again after an interruption and it skips the videos already prepared. Corrupt videos are named
in the log and in <out_dir>/prepare_summary.json. Needs PyAV (`pip install av`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from avlm.cli import unknown_option_message
from avlm.data.ave_prepare import SUMMARY_FILE, prepare_ave
from avlm.errors import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ave_prepare", description=__doc__, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--data_dir", required=True, help="AVE folder holding AVE/<VideoID>.mp4")
    parser.add_argument("--out_dir", default="", help="where frames/ and audio/ go; empty = data_dir")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        message = unknown_option_message(unknown[0], ["--data_dir", "--out_dir"])
        print(f"ave_prepare: error: {message}", file=sys.stderr)  # noqa: T201
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = prepare_ave(args.data_dir, args.out_dir or None)
    except DataError as err:
        print(f"ave_prepare: error: {err}", file=sys.stderr)  # noqa: T201
        return 2
    print(  # noqa: T201
        f"ave_prepare: {summary.decoded} decoded ({len(summary.short)} short), {summary.skipped_existing} already "
        f"prepared, {len(summary.corrupt)} corrupt, {len(summary.missing)} missing; "
        f"summary in {summary.out_dir / SUMMARY_FILE}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
