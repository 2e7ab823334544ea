"""Level 10: a content-addressed blob store for call payloads (the flight recorder)."""
