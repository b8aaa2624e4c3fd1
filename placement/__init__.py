"""placerl: placement."""
