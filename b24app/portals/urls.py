from django.urls import path

app_name = "portals"

urlpatterns: list = []
