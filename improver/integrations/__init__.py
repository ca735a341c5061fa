"""Adapters that let the improver work inside other libraries' training loops."""
