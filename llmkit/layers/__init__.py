"""The building blocks every model family is made of."""
