"""The one exception type perch-certs reports to the user as a one-line error."""

from __future__ import annotations


class CertsError(Exception):
    """A problem the user can fix (bad input, missing object); the CLI prints it and exits 2."""
