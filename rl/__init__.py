"""placerl: rl."""
