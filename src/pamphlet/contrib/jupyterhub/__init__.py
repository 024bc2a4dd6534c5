"""A JupyterHub authenticator that speaks PAM's whole conversation.

``pip install 'pamphlet[jupyterhub]'``, then in ``jupyterhub_config.py``::

    c.JupyterHub.authenticator_class = "pamphlet"
    c.PamphletAuthenticator.service = "jupyterhub"

The sign-in page asks whatever the PAM stack asks, one page per question
(the password, a one-time code, a new password when the old one has
expired) and shows the stack's info and error messages. See the guide's
JupyterHub chapter.
"""

from .authenticator import PamphletAuthenticator, PamphletLoginHandler

__all__ = ["PamphletAuthenticator", "PamphletLoginHandler"]
