"""Compiled extensions (built by setup.py from the .pyx files here)."""
