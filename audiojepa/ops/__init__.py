"""Numerics the methods share: the log-mel front end, masks, losses, the optimiser, k-means and the
teacher/student distillation of the classification head. Pure functions and small Flax-free helpers; they
import nothing else from the package."""
