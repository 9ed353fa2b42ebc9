"""Serving, lowest first: scoring rows (:mod:`.scoring`), the REST app (:mod:`.server`), Ray (:mod:`.ray_engine`),
the server as a process (:mod:`.process`) and its HTTP client (:mod:`.client`), the ``moa batch`` and ``moa serve``
commands (:mod:`.batch`, :mod:`.serve_command`)."""
