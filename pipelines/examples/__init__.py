"""The main job, the tour and their example data (not library code)."""
