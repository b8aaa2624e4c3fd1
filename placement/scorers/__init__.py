"""placerl: placement/scorers."""
