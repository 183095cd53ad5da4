"""Pieces shared by the command-line programs (flags, logging); never imported by library code."""
