"""Optuna studies, search spaces, Ray workers and the command line of jethpo."""

__version__ = "0.1.0"
