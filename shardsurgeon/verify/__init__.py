"""Reads an output back and checks it; its own arithmetic; never imports write/."""
