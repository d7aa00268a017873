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
# Seconds a connection may wait for its next request; 0 (the default) closes it after each
# answer. A gthread worker accepts connections while it has any room, not while it has a free
# thread, so with keep-alive the first worker to accept holds most of the long-lived
# connections (a load balancer's, or clients') and runs their requests on its one CPU while the
# others idle: the load bench served 150 requests/s on 2 CPUs so, 188 with every connection
# closed (docs/PERFORMANCE.md). Closing costs a TCP handshake on the hop from the TLS proxy, and
# no proxy ever reuses a connection gunicorn is about to close.
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "0"))

# One line per request, with the path only (%(U)s), never the query string: the OAuth callback's
# `code` travels there, and gunicorn's own log does not pass through the app's masking filter.
accesslog = os.environ.get("GUNICORN_ACCESS_LOG", "-") or None
access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms'

# Behind the TLS proxy, which must be the only way in (docs/SECURITY.md, "Known limits").
forwarded_allow_ips = "*"


def child_exit(server, worker):
    """A worker that exited leaves its metric files in PROMETHEUS_MULTIPROC_DIR: prometheus-client
    drops its live gauges' values there (its counters and histograms stay in /metrics' sums)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
