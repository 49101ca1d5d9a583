"""Analytic FLOP counting and scaling-law tools."""
