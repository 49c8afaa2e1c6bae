"""The one run sequence over a destination: executor, runners, small files."""
