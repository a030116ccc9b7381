"""The site-facing address: an nginx reverse proxy that passes the Fleet API and nothing else.

Flower 1.41 serves the Fleet API (what SuperNodes call), the Control API (start runs, register
or unregister site keys) and the Runtime API on one HTTPS port, and the open-source Control API
has no credentials. Flower offers no option to split them, so the SuperLink listens on
127.0.0.1 only and nginx (an existing, well-understood component) faces the sites:

- it terminates TLS with the consortium's server certificate (sites verify it with ca.crt);
- it forwards a request only when its raw URI is exactly ``/v1/fleet/<endpoint>``; anything
  else (``/v1/control/...``, ``/v1/runtime/...``, encoded or dotted paths) gets 403 before it
  reaches Flower;
- it re-encrypts to the SuperLink on 127.0.0.1 and verifies its certificate against the CA.

Site authentication is end to end: SuperNodes sign their Fleet requests and the SuperLink
checks the signatures, so the proxy needs no key of its own beyond the TLS certificate.
nginx runs as a child process (``daemon off``) with its config, logs and temp files in the
consortium's ``gateway/`` folder; ``render_config`` is the whole config, shown in the README.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from server.provision import Consortium, ProvisionError
from server.superlink import ManagedProcess

NGINX_HINT = "install nginx (Debian/Ubuntu: `apt-get install -y nginx`) or put another reverse proxy in front (see README)"


def find_nginx() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


def render_config(*, listen_host: str, listen_port: int, upstream_port: int, cert: Path, key: Path, ca: Path, workdir: Path) -> str:
    """The nginx config for the gateway (everything it does is in this text)."""
    listen = f"[{listen_host}]:{listen_port}" if ":" in listen_host else f"{listen_host}:{listen_port}"
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read the 0700 work folder
    return f"""# fedmsk gateway: only Flower's Fleet API reaches the SuperLink from the sites' network.
{user}worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log {workdir}/access.log;
    client_body_temp_path {workdir}/tmp/body;
    proxy_temp_path {workdir}/tmp/proxy;
    fastcgi_temp_path {workdir}/tmp/fastcgi;
    uwsgi_temp_path {workdir}/tmp/uwsgi;
    scgi_temp_path {workdir}/tmp/scgi;
    server_tokens off;

    # The raw request URI (before nginx decodes or normalises it) must be a Fleet endpoint.
    map $request_uri $fedmsk_fleet {{
        default 0;
        "~^/v1/fleet/[a-z0-9-]+$" 1;
    }}

    server {{
        listen {listen} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;

        client_max_body_size 0;          # model weights travel in request bodies
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_read_timeout 3600s;
        proxy_send_timeout 3600s;

        location / {{
            if ($fedmsk_fleet = 0) {{ return 403; }}
            proxy_pass https://127.0.0.1:{upstream_port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
        }}
    }}
}}
"""


def gateway_process(consortium: Consortium, *, listen_host: str, listen_port: int, upstream_port: int) -> ManagedProcess:
    """An nginx child serving the site-facing address; call ``.start()`` on it."""
    nginx = find_nginx()
    if nginx is None:
        raise ProvisionError(f"nginx not found: the gateway keeps Flower's Control API off the sites' network; {NGINX_HINT}")
    workdir = consortium.root / "gateway"
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(
        render_config(
            listen_host=listen_host, listen_port=listen_port, upstream_port=upstream_port,
            cert=consortium.server_cert, key=consortium.server_key, ca=consortium.ca_cert, workdir=workdir,
        )
    )
    return ManagedProcess("gateway", [nginx, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf)], workdir / "nginx.out")
