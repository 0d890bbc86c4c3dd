"""Prometheus exporter for Mail Partner (api.mailpartner.fr) bulk-status reports."""

__version__ = "0.1.0"
