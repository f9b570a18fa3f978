"""Engine layer: generation loops, scheduling, the resident-model manager."""
