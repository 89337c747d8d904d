"""Tests of the HTTP server: request models, the job queue, the app and its page."""
