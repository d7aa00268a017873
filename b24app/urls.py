from django.contrib import admin
from django.urls import include, path

from b24app.health import healthz
from b24app.metrics import metrics_view

urlpatterns = [
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
    path("b24/", include("b24app.portals.urls")),
    path("b24/", include("results.urls")),
]

handler500 = "b24app.errors.server_error"
