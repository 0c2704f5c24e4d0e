"""Shared fixtures: real servers started once per test session.

Each concern lives in its own plugin module so the fixtures stay readable.
"""

pytest_plugins = [
    "tests.fixtures_services",
    "tests.fixtures_llm",
]
