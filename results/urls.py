from django.urls import path

from results import views

app_name = "results"

urlpatterns = [
    path("app/", views.screen, name="screen"),
]
