"""Runnable examples; a package so that ``python -m examples.web_login`` works."""
