"""Fixtures for the agent's image side: real registries on 127.0.0.1 serving images built here.

Shared with the VM tests, so they live in the root conftest (see tests/support/fixtures.py)."""
