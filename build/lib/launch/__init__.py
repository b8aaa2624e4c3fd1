"""placerl: launch."""
