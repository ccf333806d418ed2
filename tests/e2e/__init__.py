"""Helpers for the end-to-end test that drives the notebook widgets in JupyterLab (tests/test_browser.py)."""
