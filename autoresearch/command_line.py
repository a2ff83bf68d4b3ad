"""
prepare.py's command line: its flags and their checks, a bad one in one line.
DO NOT MODIFY (fixed harness).

prepare.py parses with it before its own imports, so that `uv run prepare.py
--help` (or a mistyped flag) answers at once: torch alone takes seconds to load.
Imported by prepare.py; it imports autoresearch.files, and autoresearch.source
only once the flags have parsed (to read --text-ext).
"""

import argparse

from autoresearch.files import PrepareError


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 1, like every other bad input
        raise PrepareError(f"{message} (see uv run prepare.py --help)")


def parse_arguments(argv=None):
    """prepare.py's flags (argv: sys.argv[1:] when None), checked; text_ext comes back as
    the extensions to import as text: (".py", ".rs", ...)."""
    parser = _ArgumentParser(prog="prepare.py",
                             description="Download (or import) data, train the tokenizer, cache tokens.")
    parser.add_argument("--num-shards", type=int, default=10, help="training shards to download (-1: all 6542)")
    parser.add_argument("--download-workers", type=int, default=8, help="parallel downloads")
    parser.add_argument("--source", metavar="PATH", default=None,
                        help="import local data instead: a folder or glob of .parquet (column 'text'; the last "
                             "file is validation), .txt/.md (one document each) or .jsonl ('text' per line)")
    parser.add_argument("--text-ext", metavar="EXT[,EXT]", action="append", default=[],
                        help="with --source: also import files with these extensions as UTF-8 text, one "
                             "document each (e.g. --text-ext py,rs,c); repeatable")
    parser.add_argument("--retrain-tokenizer", action="store_true",
                        help="train the tokenizer again even though one exists")
    args = parser.parse_args(argv)
    if args.download_workers < 1:
        raise PrepareError(f"--download-workers must be at least 1, got {args.download_workers}")
    if args.num_shards < -1:
        raise PrepareError(f"--num-shards must be -1 (all) or >= 0, got {args.num_shards}")
    from autoresearch.source import text_extensions  # pyarrow: after --help has answered

    args.text_ext = text_extensions(args.text_ext)
    if args.text_ext and args.source is None:
        raise PrepareError("--text-ext only applies to an import: add --source PATH")
    return args
