"""`fastblt serve` over HTTPS: the given certificate serves, an encrypted key opens with its
password, and a certificate, key or password that does not load stops the command with one line.

tls/ holds a self-signed certificate for localhost and 127.0.0.1 (valid to 2126) and its key,
plain and encrypted (password `test-password`), and another key; for mutual TLS, a client
authority's certificate (client_ca.pem), a client certificate it signed with its key, and a
self-signed client certificate with its key (stranger_*): made for these tests, trusted nowhere
else. The client authority's own key was not kept: a new set is made with `openssl req -x509`
(the authority, basicConstraints CA:TRUE), `openssl req -new` + `openssl x509 -req -CA` (the
client, extendedKeyUsage clientAuth) and `openssl req -x509` again (the stranger).
"""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import openai
import pytest

from fastblt.serve.process import ServerProcess

from tiny import run_cli

TLS = Path(__file__).parent / "tls"
CERT, KEY, ENCRYPTED, OTHER = TLS / "cert.pem", TLS / "key.pem", TLS / "key_encrypted.pem", TLS / "other_key.pem"
PASSWORD = "test-password"
CLIENT_CA = TLS / "client_ca.pem"
CLIENT, STRANGER = (
    (TLS / "client_cert.pem", TLS / "client_key.pem"),
    (TLS / "stranger_cert.pem", TLS / "stranger_key.pem"),
)


@pytest.mark.timeout(300)
def test_a_server_with_a_certificate_answers_over_https_only(reference, tmp_path):
    args = ["--ssl-certfile", str(CERT), "--ssl-keyfile", str(ENCRYPTED), "--max-batch", "2"]
    with ServerProcess(args, env={"FASTBLT_SSL_KEYFILE_PASSWORD": PASSWORD}) as srv:
        assert srv.url.startswith("https://127.0.0.1:") and "at https://127.0.0.1:" in srv.output()
        want = reference.generate("def main(", mode="blt-s", max_bytes=16, temperature=0.0).text
        trusting = ssl.create_default_context(cafile=str(CERT))
        with httpx.Client(verify=trusting) as http:  # the client trusts this certificate, and checks the host
            c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="-", max_retries=0, timeout=60, http_client=http)
            r = c.completions.create(model="fastblt-default", prompt="def main(", max_tokens=16, temperature=0)
            assert r.choices[0].text == want
            streamed = c.completions.create(model="fastblt-default", prompt="def main(", max_tokens=16,
                                            temperature=0, stream=True)  # fmt: skip
            assert "".join(ch.choices[0].text for ch in streamed) == want
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{srv.url}/health")  # a client that trusts only the usual authorities
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{srv.url.replace('https', 'http')}/health")  # plain HTTP is not served there
        assert httpx.get(f"{srv.url}/health", verify=trusting).status_code == 200  # ... and the server is up


def _client(cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    """A client context that trusts the test server's certificate and shows `cert`, if any."""
    context = ssl.create_default_context(cafile=str(CERT))
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


@pytest.mark.timeout(300)
def test_mutual_tls_answers_only_clients_with_a_certificate_the_authority_signed(reference):
    args = ["--ssl-certfile", str(CERT), "--ssl-keyfile", str(KEY), "--ssl-ca-certs", str(CLIENT_CA),
            "--max-batch", "2", "--api-key", "k"]  # fmt: skip
    with ServerProcess(args, client_cert=CLIENT) as srv:
        want = reference.generate("def main(", mode="ar", max_bytes=12, temperature=0.0).text
        with httpx.Client(verify=_client(CLIENT)) as http:
            c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="k", max_retries=0, timeout=60, http_client=http)
            r = c.completions.create(model="fastblt-default", prompt="def main(", max_tokens=12, temperature=0,
                                     extra_body={"mode": "ar"})  # fmt: skip
            assert r.choices[0].text == want
            bad_key = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, http_client=http)
            with pytest.raises(openai.AuthenticationError):  # the API key is still asked for
                bad_key.models.list()
        for cert in (None, STRANGER):  # no certificate, or one the authority did not sign: no answer
            with pytest.raises(httpx.HTTPError):
                httpx.get(f"{srv.url}/health", verify=_client(cert))
        assert httpx.get(f"{srv.url}/health", verify=_client(CLIENT)).status_code == 200  # still up


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ssl-certfile", str(CERT)], "--ssl-certfile and --ssl-keyfile go together"),
        (["--ssl-keyfile", str(KEY)], "--ssl-certfile and --ssl-keyfile go together"),
        (["--ssl-keyfile-password", "x"], "--ssl-keyfile-password applies only with --ssl-keyfile"),
        (["--ssl-certfile", str(KEY), "--ssl-keyfile", str(KEY)], f"{KEY}: not a PEM certificate"),
        (["--ssl-certfile", str(CERT), "--ssl-keyfile", str(CERT)], f"{CERT}: not a PEM private key"),
        (["--ssl-certfile", str(CERT), "--ssl-keyfile", str(ENCRYPTED)], "encrypted: give its password"),
        (["--ssl-certfile", str(CERT), "--ssl-keyfile", str(ENCRYPTED), "--ssl-keyfile-password", "nope"],
         "not a PEM private key, or not this password's"),
        (["--ssl-certfile", str(CERT), "--ssl-keyfile", str(OTHER)], f"{OTHER}: not the private key of {CERT}"),
        (["--ssl-certfile", str(CERT), "--ssl-keyfile", "MISSING"], "'MISSING' does not exist"),
        (["--ssl-ca-certs", str(CLIENT_CA)], "--ssl-ca-certs needs --ssl-certfile and --ssl-keyfile"),
        (["--ssl-certfile", str(CERT), "--ssl-keyfile", str(KEY), "--ssl-ca-certs", str(KEY)],
         f"{KEY}: no PEM certificate in it"),
        (["--ssl-certfile", str(CERT), "--ssl-keyfile", str(KEY), "--ssl-ca-certs", str(CLIENT_CA), "--ray"],
         "--ssl-ca-certs with --ray: Ray Serve's proxies do not require client certificates"),
    ],
)  # fmt: skip
def test_a_certificate_that_does_not_load_stops_the_command_in_one_line(args, message, monkeypatch, capsys):
    code, out, err = run_cli(["serve", *args], monkeypatch, capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert out == "" and "loading" not in err  # refused before the engine loads
