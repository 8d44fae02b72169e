"""Deprecated alias of :mod:`optimum_bc.integrations.hub`; this path will be removed in 0.3."""

from ._compat import alias_module


alias_module(__name__, "optimum_bc.integrations.hub")
