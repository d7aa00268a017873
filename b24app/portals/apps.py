from django.apps import AppConfig


class PortalsConfig(AppConfig):
    name = "b24app.portals"
    label = "portals"
    verbose_name = "Bitrix24 portals"
