"""A run's machinery below the training loop: storage (local paths and gs:// URLs), workdir locks,
checkpoints, metrics files, the device mesh, multi-host start-up, host memory, profiling, worker lifetimes.
Imported by the data pipeline, the trainer and the evaluation; imports nothing else from the package."""
