"""Perch's mutating admission webhook: turns opted-in Deployment updates into canaries."""
