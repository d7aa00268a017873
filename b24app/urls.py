from django.contrib import admin
from django.urls import include, path

from b24app.health import healthz

urlpatterns = [
    path("healthz", healthz, name="healthz"),
    path("admin/", admin.site.urls),
    path("b24/", include("b24app.portals.urls")),
    path("b24/", include("results.urls")),
]

handler500 = "b24app.errors.server_error"
