from django.urls import path

from results import views

app_name = "results"

urlpatterns = [
    path("app/", views.screen, name="screen"),
    path("app/task/", views.task_results, name="task"),
    path("app/results/add/", views.result_add, name="add"),
    path("app/results/<int:result_id>/edit/", views.result_edit, name="edit"),
    path("app/results/<int:result_id>/delete/", views.result_delete, name="delete"),
    path("app/changes/", views.changes_state, name="changes"),
    path("app/changes/<int:change_id>/retry/", views.change_retry, name="retry"),
    path("app/session/", views.session_renew, name="session"),
    path("app/rebind/", views.rebind, name="rebind"),
]
