"""The ``moa`` command: its entry point and the Lightning CLI behind fit / validate / test / predict."""
