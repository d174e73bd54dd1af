"""Evaluation: click simulation, metrics, protocols and the reference pipeline (reference mode)."""
