"""Constants of the Bitrix24 transport that settings need too; this module imports nothing."""

DEFAULT_OAUTH_SERVERS = ("https://oauth.bitrix.info", "https://oauth.bitrix24.tech")
