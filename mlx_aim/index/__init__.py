"""A local image index: incremental, crash-safe embedding of photo folders into SQLite, exact
semantic search (text with a LiT model, images, mixed weighted queries) and near-duplicates.

See :class:`Index`; ``mlx-aim index`` and ``mlx-aim search`` are its command line.
"""

from .core import Hit, Index, Pair, Summary, default_db

__all__ = ["Hit", "Index", "Pair", "Summary", "default_db"]
