"""optserve: Keras optimizers as a service.

The subpackages live in the repository's top-level folders ``protos/``,
``server/`` and ``client/``; this package reaches them through symbolic links
(see "Source layout" in docs/architecture.md).
"""
