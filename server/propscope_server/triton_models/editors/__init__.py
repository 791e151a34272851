"""Editors: models that turn one image into a path of gradually stronger edits."""
