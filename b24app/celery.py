"""Celery wired the standard Django way: `celery -A b24app worker`.

All configuration lives in settings (the `CELERY_` namespace). Without `CELERY_BROKER_URL`
tasks run inline in the calling process (see settings), so the embedded default needs no broker.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "b24app.settings")

app = Celery("b24app")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
