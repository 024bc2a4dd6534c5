"""Adapters that put pamphlet where users already are, each shipped as an extra.

- :mod:`pamphlet.contrib.jupyterhub`: a JupyterHub authenticator
  (``pip install 'pamphlet[jupyterhub]'``);
- :mod:`pamphlet.contrib.django`: an authentication backend and a multi-step
  login view (``pip install 'pamphlet[django]'``).

Nothing here is imported by ``import pamphlet``: each adapter imports its
framework, which the core never needs.
"""
