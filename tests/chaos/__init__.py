"""Helpers of the chaos suite (tests/test_chaos_*.py): a run tree to disturb,
workers and servers to kill and restart, and what to read from histories."""
