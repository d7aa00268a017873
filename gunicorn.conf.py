"""gunicorn's settings for the Procfile's `web` process, and for the tests' and benches' app server
(`tests/appserver.py`), which override only the address, the process counts and the access log.

`gunicorn -c gunicorn.conf.py` (the Procfile's command) serves `b24app.wsgi` with threads: a
request mostly waits on Bitrix24, so threads, not processes, carry the concurrency.
"""

import os

wsgi_app = "b24app.wsgi"
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"

# One line per request, with the path only (%(U)s), never the query string: the OAuth callback's
# `code` travels there, and gunicorn's own log does not pass through the app's masking filter.
accesslog = os.environ.get("GUNICORN_ACCESS_LOG", "-") or None
access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms'

# Behind the TLS proxy, which must be the only way in (docs/SECURITY.md, "Known limits").
forwarded_allow_ips = "*"
