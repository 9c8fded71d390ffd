"""Training configurations (ml_collections); each file defines ``get_config()``."""
