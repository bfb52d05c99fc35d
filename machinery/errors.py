"""How the programs report bad input: one line naming the file, line and problem, and exit status 2.

Every entry point (train.py, evaluate.py, prepare.py, retriever.py) catches InputError in its main()
and prints `error: <message>`; argparse mistakes go the same way through OneLineParser.
"""

from __future__ import annotations

import argparse


class InputError(ValueError):
    """Bad user input. str(e) is one line: 'FILE:LINE: problem' (LINE left out when it does not
    apply)."""


class OneLineParser(argparse.ArgumentParser):
    """Command-line mistakes end in one line naming the problem and a non-zero exit. A flag is
    taken only when spelt out whole: argparse's abbreviations made `--outcome` mean --outcome_only
    and a typo name another flag."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise InputError(f"command line: {message} (see --help)")


class TrainingError(RuntimeError):
    """Training cannot go on (repeated non-finite steps, a diverged model, a save that failed);
    the message says what is on disk."""


class RetrieverError(RuntimeError):
    """The remote retriever could not answer; message names the URL and the last error."""
