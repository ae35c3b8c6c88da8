"""Example oncely apps (installed as oncely.examples)."""
