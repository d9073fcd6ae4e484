"""Ray Serve entry points (`serve run serve/config.yaml`); the logic lives in the `lsvcr.serve` package."""
