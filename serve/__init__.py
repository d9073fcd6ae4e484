"""Ray Serve entry points (`serve run serve/config.yaml`); the logic lives in `lsvcr.serving`."""
