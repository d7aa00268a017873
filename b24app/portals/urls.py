from django.urls import path

from b24app.portals import views

app_name = "portals"

urlpatterns = [
    path("install/", views.install, name="install"),
    path("events/", views.events, name="events"),
    path("oauth/start/", views.oauth_start, name="oauth_start"),
    path("oauth/callback/", views.oauth_callback, name="oauth_callback"),
]
