"""Provisioning, app approval and launch plumbing, without starting servers (fast)."""

import hashlib
import os
import shlex
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.approval import ApprovedBuilds, UnapprovedBuildError, fab_sha256
from client.join import load_join, node_config
from server.gateway import render_config
from server.launch import check_app, overrides_config
from server.provision import Consortium, ProvisionError
from shared.config import ConfigError, load_site_file
from deploy_helpers import write_toy_app


@pytest.fixture()
def consortium(tmp_path):
    c = Consortium(tmp_path / "consortium")
    c.init("fl.example.org:9443", ["10.1.2.3"])
    return c


def test_server_certificate_is_signed_by_the_ca_with_loopback_and_public_sans(consortium):
    ca = x509.load_pem_x509_certificate(consortium.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(consortium.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(san.get_values_for_type(x509.DNSName)) | {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert {"localhost", "127.0.0.1", "fl.example.org", "10.1.2.3"} <= names
    assert stat.S_IMODE(consortium.ca_key.stat().st_mode) == 0o600
    with pytest.raises(ProvisionError, match="already holds a consortium"):
        consortium.init("fl.example.org:9443")


def test_site_bundle_holds_only_its_own_key_in_flowers_format(consortium):
    a = consortium.add_site("site_a")
    files_a = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in a.iterdir()}
    b = consortium.add_site("site_b")

    assert sorted(files_a) == ["ca.crt", "join.yaml", "privacy.yaml", "site.key", "site.pub", "site.yaml"]
    # adding site_b reissued nothing of site_a's
    assert files_a == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in a.iterdir()}
    assert stat.S_IMODE((a / "site.key").stat().st_mode) == 0o600
    # the key pair is ECDSA P-384 in OpenSSH format, public and private halves match
    private = serialization.load_ssh_private_key((a / "site.key").read_bytes(), None)
    public = serialization.load_ssh_public_key((a / "site.pub").read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    assert (a / "site.pub").read_bytes().startswith(b"ecdsa-sha2-nistp384 ")
    # no other private key in the bundle: not the server's, not the CA's, not site_b's
    others = [consortium.ca_key.read_bytes(), consortium.server_key.read_bytes(), (b / "site.key").read_bytes()]
    for f in a.iterdir():
        assert all(secret not in f.read_bytes() for secret in others)
        if f.name != "site.key":
            assert b"PRIVATE KEY" not in f.read_bytes()
    # the site config is in the schema the ClientApp reads, with the name filled in
    assert load_site_file(a / "site.yaml").name == "site_a"
    settings = load_join(a)
    assert settings.superlink == "fl.example.org:9443" and settings.private_key == (a / "site.key").resolve()


def test_existing_site_needs_rotate_and_rotation_changes_the_key(consortium):
    consortium.add_site("site_a")
    first = consortium.site("site_a").fingerprint
    with pytest.raises(ProvisionError, match="already exists"):
        consortium.add_site("site_a")
    consortium.mark_revoked("site_a")
    with pytest.raises(ProvisionError, match="--rotate"):
        consortium.add_site("site_a")
    consortium.add_site("site_a", rotate=True)
    rec = consortium.site("site_a")
    assert rec.fingerprint != first and rec.key_generation == 2 and not rec.revoked and rec.node_id is None


def test_join_refuses_a_shared_key_and_an_unedited_data_folder(consortium, tmp_path):
    bundle = consortium.add_site("site_a")
    settings = load_join(bundle)
    with pytest.raises(ConfigError, match="set data_dir"):
        node_config(settings)
    data = tmp_path / "data"
    data.mkdir()
    (data / "clinical.csv").write_text("patient_id\n")
    config = node_config(settings, data_dir=str(data))
    # the ClientApp reads the site's own settings and privacy policy from these node-config keys
    assert f'site-config="{settings.site_config}"' in config and f'privacy-config="{settings.privacy_policy}"' in config
    assert f'data-dir="{data}"' in config
    os.chmod(bundle / "site.key", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_join(bundle)


def test_approval_hash_equals_flowers_build_and_one_byte_changes_it(tmp_path):
    app = write_toy_app(tmp_path / "app")
    digest, fab_id = fab_sha256(app)
    out = subprocess.run([str(Path(sys.executable).with_name("flwr")), "build", "--app", str(app)],
                         capture_output=True, text=True, cwd=tmp_path)
    fab = next(tmp_path.glob("*.fab"), None) or next(app.glob("*.fab"))
    assert out.returncode == 0 and hashlib.sha256(fab.read_bytes()).hexdigest() == digest
    assert fab_sha256(fab)[0] == digest and fab_id == "fedmsk-test/toy"

    store = ApprovedBuilds(tmp_path / "approved.json")
    with pytest.raises(UnapprovedBuildError, match=digest):
        store.check(fab.read_bytes())
    store.approve(app)
    assert store.check(fab.read_bytes()) == digest
    changed = bytearray(fab.read_bytes())
    changed[-1] ^= 1
    with pytest.raises(UnapprovedBuildError):
        store.check(bytes(changed))
    assert store.revoke(digest) and not store.load()


def test_launch_passes_overrides_intact_and_refuses_an_app_flower_would_rewrite(tmp_path):
    overrides = ["rounds=2", "model=image_only", "task.image_size=[32,32]", "run_dir=/tmp/a b"]
    value = tomllib.loads(overrides_config(overrides))["overrides"]
    assert shlex.split(value) == overrides  # what the ServerApp does with it
    app = write_toy_app(tmp_path / "app")
    check_app(app)
    with open(app / "pyproject.toml", "a") as fh:
        fh.write('\n[tool.flwr.federations]\ndefault = "x"\n')
    with pytest.raises(ConfigError, match="federations"):
        check_app(app)


def test_gateway_forwards_only_raw_fleet_paths(tmp_path):
    text = render_config(listen_host="127.0.0.1", listen_port=9443, upstream_port=9093, cert=Path("s.crt"),
                         key=Path("s.key"), ca=Path("ca.crt"), workdir=tmp_path)
    assert '"~^/v1/fleet/[a-z0-9-]+$" 1;' in text and "map $request_uri" in text
    assert "if ($fedmsk_fleet = 0) { return 403; }" in text
    assert "proxy_pass https://127.0.0.1:9093;" in text and "proxy_ssl_verify on;" in text
    assert "listen 127.0.0.1:9443 ssl;" in text


def test_the_server_restarts_a_dead_child_once_and_gives_up_after_the_limit(consortium, tmp_path):
    """supervise() with stand-in children (sleeping processes): a dead SuperLink restarts with one
    fresh executor (the old one stopped, none orphaned); a child dying past the limit ends the server."""
    from server.superlink import CoordinatorServer, ManagedProcess, ServerDied

    srv = CoordinatorServer(consortium, gateway=False, max_restarts=2)
    started = []

    def child(name):
        proc = ManagedProcess(name, [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / f"{name}.log").start()
        started.append(proc)
        return proc

    srv._start_superlink = lambda: setattr(srv, "superlink", child("SuperLink"))
    srv._start_executor = lambda: setattr(srv, "executor", child("executor"))
    try:
        srv._start_superlink()
        srv._start_executor()
        first_executor = srv.executor
        srv.superlink.signal_group(9)
        srv.superlink.proc.wait(timeout=10)
        events = srv.supervise()
        assert len(events) == 1 and events[0].startswith("SuperLink died (exit code -9)") and "(1/2)" in events[0]
        assert not first_executor.alive() and srv.executor.alive()
        assert [p.name for p in started if p.alive()] == ["SuperLink", "executor"]  # no orphaned executor
        for _ in range(2):
            srv.executor.signal_group(9)
            srv.executor.proc.wait(timeout=10)
            assert "executor died" in srv.supervise()[0]
        srv.executor.signal_group(9)
        srv.executor.proc.wait(timeout=10)
        with pytest.raises(ServerDied, match="died 3 times"):
            srv.supervise()
    finally:
        for proc in started:
            proc.stop(timeout=2)
