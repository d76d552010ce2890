"""Training entry point, configs and data pipeline of capsjax."""
