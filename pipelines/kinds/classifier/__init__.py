"""The classifier kind: an encoder with MoA pools and a label head per task."""
