"""Evaluations run on the engine (needle-in-a-haystack)."""
