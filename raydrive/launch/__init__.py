"""The driver side of a run: config resolution, Ray connection, TorchTrainer, stages, offline evaluation."""
