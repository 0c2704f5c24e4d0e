"""The trace viewer behind `rlm ui`: a local page that shows runs as they
are stored (history, transcript, cell outputs); see cli/ui/server.py."""
