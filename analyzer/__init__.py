"""Perch's analyzer: advances canaries, judges metrics, promotes or rolls back (next milestone)."""
