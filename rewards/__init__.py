"""placerl: rewards."""
