"""The errors a user can fix: a bad file, dataset, configuration or run directory.

Every such error derives from ``SamadaptError``; the ``samadapt`` command prints them (and ``FileNotFoundError`` /
``ValueError`` / ``KeyError`` from argument checks) in one line. Anything else is a bug or a resource failure and
keeps its traceback.
"""

from __future__ import annotations


class SamadaptError(Exception):
    """A problem with what the user gave samadapt, named in the message (file, key, value)."""
