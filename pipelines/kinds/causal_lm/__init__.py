"""The causal-LM kind: a decoder with MoA pools, trained on target tokens, served by generation."""
