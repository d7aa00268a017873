"""WSGI entry point (gunicorn b24app.wsgi)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "b24app.settings")

application = get_wsgi_application()
