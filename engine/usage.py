"""Command-line usage errors, shared by every `hotserve` sub-command: one line, exit 64."""

from __future__ import annotations

import argparse

EX_USAGE = 64


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)
