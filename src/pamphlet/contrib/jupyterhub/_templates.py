"""The sign-in pages, in JupyterHub's own template style.

``pamphlet_login.html`` extends the hub's ``login.html`` (so a site's own
``login.html``, logo, navigation bar and announcement still apply) and
replaces only the form: one page per question of the PAM stack. A hub can
override it by putting a ``pamphlet_login.html`` in
``c.JupyterHub.template_paths``, which are searched first.
"""

from __future__ import annotations

__all__ = ["TEMPLATES"]

LOGIN = """\
{% extends "login.html" %}
{% block login_container %}
<form action="{{ form_action }}" method="post" role="form" id="pamphlet-form">
  <div class="auth-form-header">
    <h1>{{ title }}</h1>
  </div>
  <div class="auth-form-body m-auto">
    <p id="insecure-login-warning" class="hidden alert alert-warning">
      Warning: JupyterHub seems to be served over an unsecured HTTP connection.
      We strongly recommend enabling HTTPS for JupyterHub.
    </p>
    {% for notice in notices %}
    <p class="pamphlet-notice alert
              {{ 'alert-danger login_error' if notice.is_error else 'alert-info' }}"
       data-kind="{{ 'error' if notice.is_error else 'info' }}">{{ notice }}</p>
    {% endfor %}
    <input type="hidden" name="_xsrf" value="{{ xsrf }}" />
    {% if first_page %}
      <label for="username_input">Username:</label>
      <input id="username_input" type="text" autocapitalize="off" autocorrect="off"
             autocomplete="username" class="form-control" name="username"
             value="{{ username or '' }}" {% if not username %}autofocus="autofocus"{% endif %} />
      {% if ask_password %}
      <label for="password_input">Password:</label>
      <input id="password_input" type="password" class="form-control"
             autocomplete="current-password" name="password"
             {% if username %}autofocus="autofocus"{% endif %} />
      {% endif %}
    {% else %}
      <input type="hidden" name="step" value="{{ step }}" />
      {% for prompt in prompts %}
      <label for="pamphlet_answer_{{ loop.index0 }}">{{ prompt }}</label>
      <input id="pamphlet_answer_{{ loop.index0 }}" class="form-control" name="answer"
             type="{{ 'password' if prompt.wants_password else 'text' }}"
             autocapitalize="off" autocorrect="off"
             autocomplete="{{ 'one-time-code' if not prompt.wants_password else 'off' }}"
             {% if loop.first %}autofocus="autofocus"{% endif %} />
      {% endfor %}
    {% endif %}
    {% if continue_url %}
      <a role="button" id="pamphlet_continue" class="btn btn-jupyter form-control"
         href="{{ continue_url }}">Continue</a>
    {% elif waiting %}
      <p class="pamphlet-waiting">Still checking&hellip;
        <a href="{{ form_action }}">Reload</a> in a moment.</p>
    {% else %}
    <div class="feedback-container">
      <input id="login_submit" type="submit" class="btn btn-jupyter form-control"
             value="{{ 'Sign in' if first_page else 'Continue' }}" />
      <div class="feedback-widget hidden"><i class="fa fa-spinner"></i></div>
    </div>
    {% endif %}
    {% if not first_page and not continue_url %}
      <p class="pamphlet-restart"><a href="{{ restart_url }}">Start over</a></p>
    {% endif %}
  </div>
</form>
{% endblock login_container %}
"""

TEMPLATES = {"pamphlet_login.html": LOGIN}
