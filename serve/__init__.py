"""Ray Serve scoring service for tocoad-ray artifacts (see serve/README.md)."""
