"""Checkers for the course's classroom exercises (to come)."""
