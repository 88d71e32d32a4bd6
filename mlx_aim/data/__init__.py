"""Images on disk: decoding, discovery, captions, transforms, the loader and the built-in sets."""
