"""The web-UI-compatible HTTP server: request models, the job queue, the app and its page."""
