"""Test helpers shipped in the wheel: the backend contract suite and real server launchers."""
