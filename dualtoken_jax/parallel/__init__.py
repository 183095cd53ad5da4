"""Meshes, logical-axis sharding rules and multi-process placement."""
