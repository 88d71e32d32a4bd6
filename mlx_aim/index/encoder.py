"""The model side of an index: unit embeddings of image files, query images and texts.

:class:`ModelEncoder` wraps :class:`~mlx_aim.tasks.embed.Embedder` (the compiled batched forward,
images decoded in background threads while the model runs), so ``index`` runs at ``embed``'s
throughput. Its ``identity`` (model source, weights digest, pooling) and the vectors' width are
what an index records and checks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ..data.images import ImageError
from ..errors import InputError

DIGEST_SAMPLE = 4096  # values hashed per large tensor: see weights_digest


class Encoder(Protocol):
    """What an index needs from a model (tests substitute a fast fake)."""

    identity: dict[str, Any]  # model, digest, pool (and dim, or ``width()`` gives it)

    def width(self) -> int: ...

    def stream(
        self,
        paths: Sequence[str],
        on_error: Callable[[ImageError], None],
        opener: Callable[[Path], Image.Image],
    ) -> Iterator[tuple[list[str], np.ndarray]]: ...

    def images(self, paths: Sequence[Path]) -> np.ndarray: ...

    def texts(self, texts: Sequence[str]) -> np.ndarray: ...


def model_source(model: str | os.PathLike) -> str:
    """How an index names a model: a registry name as given, a folder or file as its absolute path."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


class ModelEncoder:
    """Unit-norm embeddings from an mlx-aim model (a registry name, a folder, or a loaded module)."""

    def __init__(
        self,
        model: Any,
        *,
        pool: str = "auto",
        batch_size: int = 16,
        workers: int = 2,
    ):
        import mlx.nn as nn

        import mlx_aim
        from mlx_aim.tasks.embed import Embedder
        from mlx_aim.tasks.features import weights_digest

        source = "<in-memory model>" if isinstance(model, nn.Module) else model_source(model)
        net = model if isinstance(model, nn.Module) else mlx_aim.load(model)
        if pool == "tokens":
            raise InputError(
                "an index stores one vector per image; use a pooling other than tokens"
            )
        try:
            self.embedder = Embedder(net, pool=pool, normalize=True, batch_size=batch_size)
        except ValueError as e:
            raise InputError(f"model {source}: {e}") from None
        self.model = net
        self.workers = workers
        self.identity = {
            "model": source,
            "digest": weights_digest(net, net.args.to_dict(), sample=DIGEST_SAMPLE),
            "pool": self.embedder.pool,
        }

    def width(self) -> int:
        """The width of the vectors (one forward pass of a blank image)."""
        return int(self.embedder(Image.new("RGB", (32, 32))).shape[-1])

    def stream(
        self,
        paths: Sequence[str],
        on_error: Callable[[ImageError], None],
        opener: Callable[[Path], Image.Image],
    ) -> Iterator[tuple[list[str], np.ndarray]]:
        """Batches ``(paths, unit vectors)`` of the readable files, in order."""
        return self.embedder.stream_files(
            paths, on_error=on_error, num_workers=self.workers, opener=opener
        )

    def images(self, paths: Sequence[Path]) -> np.ndarray:
        """Unit vectors (N, D) of query images."""
        try:
            return np.asarray(self.embedder(list(paths)), np.float32)
        except ImageError as e:
            raise InputError(f"query image {e}") from None

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors (N, D) of query texts (a LiT model's text tower)."""
        from mlx_aim.tasks.embed import embed_texts

        if self.model.args.model_type != "aim_v2_lit":
            raise InputError(
                f"text queries need a LiT model (with a text tower); this index was built with "
                f"{self.identity['model']}. Query with an image, or index with "
                "--model aimv2-large-patch14-224-lit (or a LiT run)"
            )
        if self.embedder.pool != "projection":
            raise InputError(
                f"text queries need the projection pooling (the shared image-text space), not "
                f"{self.embedder.pool}"
            )
        return embed_texts(self.model, list(texts), normalize=True)
