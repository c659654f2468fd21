"""The streaming server: runtime (models, sessions, scheduler) and front doors."""
