"""Audio data: shards, front-end transforms, the Grain input pipeline and the embedded corpus."""
