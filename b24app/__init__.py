"""The Bitrix24 app shell: settings, Celery, portal connections, OAuth and the REST client."""

from .celery import app as celery_app

__all__ = ("celery_app",)
