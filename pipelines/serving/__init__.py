"""Serving: the REST server, the serve and batch commands, and Ray scale-out."""
