"""What every layer shares: the typed config, errors, one IO abstraction over fsspec, URI rules,
render settings and the names under the output prefix. Imports nothing else of the package."""
