"""The checks of tests/packaging/check_packaging.py, one module per kind of artefact."""
