"""Image loading and validation, captions, and Kohya dataset folders (issue 4).

Public, stable entry points (others import them: the engine for training data, the UI for the
gallery): `images.load_image`, `images.scan_images`, `captions.*`, `prepare.prepare_dataset`.
"""
