import logging

import pytest

from b24app.logs import OneLineFormatter, SecretMaskingFilter
from b24app.masking import mask_secret, mask_secrets

FRAME_AUTH_ID = "4991e86600715db20058f18a00000001302a076f538759f623791a7dece3ebd357ae95"
EVENT_ACCESS = "s6p6eclrvim6da22ft9ch94ekreb52lv"
APP_TOKEN = "51856fefc120afa4b628cc82d3935cce"
MEMBER_ID = "a223c6b3710f85df22e9377d6c4f7553"


@pytest.mark.parametrize(
    "text, secret",
    [
        (f"POST body AUTH_ID={FRAME_AUTH_ID}&member_id={MEMBER_ID}", FRAME_AUTH_ID),
        (f"auth[access_token]={EVENT_ACCESS}&auth[member_id]={MEMBER_ID}", EVENT_ACCESS),
        (f"auth[application_token]={APP_TOKEN}", APP_TOKEN),
        (f'{{"refresh_token": "{EVENT_ACCESS}", "member_id": "{MEMBER_ID}"}}', EVENT_ACCESS),
        (f"{{'access_token': '{FRAME_AUTH_ID}'}}", FRAME_AUTH_ID),
        (
            "GET /oauth/token/?grant_type=refresh_token&client_secret=LJSl0lNB76B5YY6u0YVQ",
            "LJSl0lNB76B5YY6u0YVQ",
        ),
        (f"token expired for {FRAME_AUTH_ID}", FRAME_AUTH_ID),
        (f"unknown value {EVENT_ACCESS} seen", EVENT_ACCESS),
        (f"APPLICATION_TOKEN: {APP_TOKEN}", APP_TOKEN),
        (f'{{"auth": "{APP_TOKEN}", "id": 17}}', APP_TOKEN),
    ],
)
def test_mask_secrets_hides_token_shapes(text, secret):
    masked = mask_secrets(text)
    assert secret not in masked
    assert secret[:4] + "***" in masked


def test_mask_secrets_keeps_member_id_and_codes_readable():
    text = f"portal {MEMBER_ID} answered QUERY_LIMIT_EXCEEDED for tasks.task.result.update id=17"
    assert mask_secrets(text) == text


def test_mask_secrets_hides_configured_secrets(settings):
    settings.B24_CLIENT_SECRET = "a-very-odd-Client-Secret-value"
    assert "a-very-odd-Client-Secret-value" not in mask_secrets(
        "oops a-very-odd-Client-Secret-value"
    )


def test_mask_secrets_hides_the_frame_signing_key(settings):
    settings.B24_FRAME_SIGNING_KEY = "Zx8Wq2Lp5Nv9Rt3Yk7Hb1Mc6Df4Gs0Aj-Ue_Oi8Ek2Qw6Xr9Tn3Pb7Cy5Hl1"
    assert settings.B24_FRAME_SIGNING_KEY not in mask_secrets(
        f"oops {settings.B24_FRAME_SIGNING_KEY}"
    )


def test_mask_secrets_hides_the_metrics_token(settings):
    settings.B24_METRICS_TOKEN = "metrics-token-Rk3wZ9qL2mT7vB5nC8xJ4hD6"
    assert settings.B24_METRICS_TOKEN not in mask_secrets(f"oops {settings.B24_METRICS_TOKEN}")


def test_mask_secrets_hides_the_health_token(settings):
    settings.B24_HEALTH_TOKEN = "health-token-Qm8vX2pL7wR4tN8bC1yH6sF5"
    assert settings.B24_HEALTH_TOKEN not in mask_secrets(f"Bearer {settings.B24_HEALTH_TOKEN}")


def _emit(logger_name: str, *args, exc: BaseException | None = None) -> str:
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Collect()
    handler.addFilter(SecretMaskingFilter())
    handler.setFormatter(OneLineFormatter())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        if exc is None:
            logger.warning(*args)
        else:
            try:
                raise exc
            except type(exc):
                logger.exception(*args)
    finally:
        logger.removeHandler(handler)
    assert len(records) == 1
    return records[0]


def test_log_line_masks_arguments_and_tracebacks_on_one_line():
    line = _emit(
        "tests.masking",
        "refresh failed for %s",
        {"refresh_token": EVENT_ACCESS},
        exc=ValueError(f"bad AUTH_ID={FRAME_AUTH_ID}"),
    )
    assert EVENT_ACCESS not in line
    assert FRAME_AUTH_ID not in line
    assert "\n" not in line
    assert "ValueError" in line and "refresh failed for" in line


def test_logging_config_masks_on_the_stdout_handler(settings):
    assert settings.LOGGING["handlers"]["stdout"]["stream"] == "ext://sys.stdout"
    handler = next(h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler))
    record = logging.LogRecord(
        "b24app.anything",
        logging.WARNING,
        __file__,
        1,
        "event auth[access_token]=%s",
        (EVENT_ACCESS,),
        None,
    )
    assert handler.filter(record)
    line = handler.format(record)
    assert line.endswith("WARNING b24app.anything event auth[access_token]=s6p6***")


def test_mask_secrets_hides_the_oauth_code_in_a_logged_callback_url():
    line = '"GET /b24/oauth/callback/?code=0a1b2c3d4e5f60718293a4b5c6d7e8f9&state=x HTTP/1.1" 302'
    assert "0a1b2c3d4e5f60718293a4b5c6d7e8f9" not in mask_secrets(line)
    assert "error=QUERY_LIMIT_EXCEEDED" in mask_secrets("call error=QUERY_LIMIT_EXCEEDED")


CLIENT_SECRET = "LJSl0lNB76B5YY6u0YVQ3AW0DrVADcRTwVr4y99PXU1BWQybWK"
REFRESH = "4s386p3q0tr8dy89xvmt96234v3dljg8"
CODE = "avmocpghblyi01m3h42bljvqtyd19sw1"
TOKEN_QUERY = f"client_id=app.573ad8a0346747.09223434&client_secret={CLIENT_SECRET}"


@pytest.mark.parametrize(
    "text",
    [
        # urllib3.connectionpool's DEBUG request line of a refresh and of a code exchange by GET
        f'https://oauth.bitrix.info:443 "GET /oauth/token/?grant_type=refresh_token&{TOKEN_QUERY}'
        f'&refresh_token={REFRESH} HTTP/1.1" 200 None',
        f'https://oauth.bitrix.info:443 "GET /oauth/token/?grant_type=authorization_code'
        f'&code={CODE}&{TOKEN_QUERY} HTTP/1.1" 400 87',
        # requests' ConnectionError text (urllib3's MaxRetryError), which embeds the URL
        "HTTPSConnectionPool(host='oauth.bitrix.info', port=443): Max retries exceeded with url: "
        f"/oauth/token/?grant_type=refresh_token&{TOKEN_QUERY}&refresh_token={REFRESH} "
        "(Caused by NewConnectionError('Failed to establish a new connection'))",
        # urllib3.util.retry's record, the URL quoted
        f"Incremented Retry for (url='/oauth/token/?refresh_token={REFRESH}&code={CODE}"
        f"&client_secret={CLIENT_SECRET}'): Retry(total=0)",
    ],
)
def test_mask_secrets_hides_the_secrets_of_a_token_request_by_get(text):
    masked = mask_secrets(text)
    for secret in (CLIENT_SECRET, REFRESH, CODE):
        assert secret not in masked
    for readable in ("client_secret=", "refresh_token=", "code=", "client_id=app.", "oauth.bi"):
        if readable in text:
            assert readable in masked  # keys, the client id and the host stay readable
    assert masked.count("***") == sum(text.count(key) for key in ("secret=", "token=", "code="))


def test_mask_secrets_hides_percent_encoded_query_values():
    masked = mask_secrets("/oauth/token/?client_secret=Ab%2Bcd%2F3efG%3D%3D&code=zz-z_y.y~1")
    assert "cd%2F3efG" not in masked and "z_y.y~1" not in masked
    assert "client_secret=Ab%2***" in masked


def test_mask_secrets_hides_token_request_values_by_their_key_whatever_their_shape():
    """Not every value looks like a token (these are no hex run, no 32-char token): the key
    alone must be enough."""
    text = "GET /oauth/token/?refresh_token=Rt.Unusual-Shape_01&code=Cd.Unusual-Shape_02"
    text += "&client_secret=Cs.Unusual-Shape_03 HTTP/1.1"
    masked = mask_secrets(text)
    assert "Unusual-Shape" not in masked
    assert "refresh_token=Rt.U***" in masked and "code=Cd.U***" in masked
    assert "client_secret=Cs.U***" in masked


def test_mask_secret_keeps_four_characters_of_a_long_value_and_none_of_a_short_one():
    assert mask_secret("51856fefc120afa4b628cc82d3935cce") == "5185***"
    assert mask_secret("short") == "***"
    assert mask_secret("") == "" and mask_secret(None) == ""
