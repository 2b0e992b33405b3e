"""The power governor: policies, the actuator (the only code that changes a device), audit, service."""
