"""Frozen copies of earlier wire-protocol releases, for compatibility tests."""
