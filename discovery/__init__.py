"""Service catalog: model, stores, registration and health checks (lowest layer)."""
