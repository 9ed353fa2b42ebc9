"""Model kinds: one subpackage per kind (its LightningModule, bundle writer and serving flavour)."""
