"""Ray wiring only (TorchTrainer workers, FID scorer actors, Tune trainables, Jobs): calls sida_core, never re-implements it."""
