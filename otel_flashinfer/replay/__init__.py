"""Pull a trace's payloads into a verified local bundle and replay its calls."""
