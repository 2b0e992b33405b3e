"""Wattlane: an energy-aware inference scheduler (gateway, router, meters, power governor)."""

__version__ = "0.1.0"
