"""The configuration: the typed schema (schema.py) and what identifies a variant (identity.py)."""

from sdxl_ablate.config.schema import *  # noqa: F401,F403  (the schema's public names, __all__)
from sdxl_ablate.config.identity import config_hash, hashed_items  # noqa: F401
