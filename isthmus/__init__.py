"""The appliance shell: configuration, CLI, control API, wiring and telemetry."""

__version__ = "0.1.0"
