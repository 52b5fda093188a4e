"""Perch's shared domain core: what the webhook and the analyzer both need."""
