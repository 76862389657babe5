"""Model definitions and the artifact format. Imports nothing else of recsql."""

from model.artifact import load_model, pack, safe_extract, save_mfblock
from model.errors import RecsqlError
from model.recommender import IdIndex, Recommender

__all__ = [
    "IdIndex",
    "Recommender",
    "RecsqlError",
    "load_model",
    "pack",
    "safe_extract",
    "save_mfblock",
]
