"""Adapters that put pamphlet where users already are, each shipped as an extra.

- :mod:`pamphlet.contrib.jupyterhub`: a JupyterHub authenticator
  (``pip install 'pamphlet[jupyterhub]'``).

Nothing here is imported by ``import pamphlet``: each adapter imports its
framework, which the core never needs.
"""
