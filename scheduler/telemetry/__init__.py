"""Telemetry beyond the ledger and Prometheus: OpenTelemetry traces (otel.py, needs the [otel] extra)."""
