"""sscardd: card-reader middleware for Chinese social security cards."""

__version__ = "0.1.0"
