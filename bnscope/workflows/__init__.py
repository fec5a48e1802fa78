"""What each command does, end to end: load, analyse or rewrite, verify. Returns dataclasses, never prints."""
