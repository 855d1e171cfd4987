"""Auxiliary tools (model format conversion) that are not part of the merge engine."""
