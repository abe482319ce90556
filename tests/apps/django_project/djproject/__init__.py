"""A fresh Django project for the real-server tests (settings from the environment: see settings.py)."""
