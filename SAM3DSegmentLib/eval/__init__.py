"""Evaluation: click simulation, metrics, protocols, reports, the reference pipeline and reference mode."""
