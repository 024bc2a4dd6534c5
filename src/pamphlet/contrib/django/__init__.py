"""pamphlet for Django: an authentication backend and a multi-step login view.

``pip install 'pamphlet[django]'``; add ``"pamphlet.contrib.django"`` to
``INSTALLED_APPS``, ``"pamphlet.contrib.django.backends.PamBackend"`` to
``AUTHENTICATION_BACKENDS``, and configure the one setting ``PAMPHLET`` (see
:mod:`pamphlet.contrib.django.conf` and docs/guide/django.md).

- :class:`~pamphlet.contrib.django.backends.PamBackend` checks a user name and
  password against a PAM service (``authenticate`` then ``acct_mgmt``),
  creates or updates the Django user and maps system groups to ``is_staff``
  and ``is_superuser``.
- :class:`~pamphlet.contrib.django.views.PamLoginView` runs the whole
  conversation of stacks that ask more than a password (a one-time code, an
  expired password's change), one page per prompt. The transaction lives in
  the pamphlet broker between requests, so any worker process of the site
  can serve the next step.

Nothing here is imported by ``import pamphlet``; Django is needed only here.
"""
