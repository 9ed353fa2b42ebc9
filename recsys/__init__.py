"""Recommendation on top of moa (cross-domain sequential recommendation): see issue 6. Imports moa core only."""
