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
from deploy_helpers import REPO, write_toy_app


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


def test_a_warm_clientapp_forgets_preloaded_modules_the_approved_build_does_not_hold(monkeypatch):
    """client.warm: a preloaded package is reused only when the FAB holds byte-identical copies."""
    import io
    import types
    import zipfile

    import client.warm as warm

    same, changed = b"x = 1\n", b"x = 2\n"
    digest = hashlib.sha256(same).hexdigest()
    monkeypatch.setattr(warm, "_PRELOADED", {"fakepkg.mod": ("fakepkg/mod.py", digest), "otherpkg.mod": ("otherpkg/mod.py", digest)})
    for name in ("fakepkg", "fakepkg.mod", "otherpkg", "otherpkg.mod"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))

    def fab(files: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for path, content in files.items():
                z.writestr(path, content)
        return buf.getvalue()

    assert warm.drop_stale_modules(fab({"fakepkg/mod.py": same, "otherpkg/mod.py": same})) == []
    assert "fakepkg.mod" in sys.modules and "otherpkg" in sys.modules
    # one package's file differs, the other is missing from the build: both are imported from the build
    assert warm.drop_stale_modules(fab({"fakepkg/mod.py": changed})) == ["fakepkg", "otherpkg"]
    assert not {"fakepkg", "fakepkg.mod", "otherpkg", "otherpkg.mod"} & set(sys.modules)


def test_the_warm_fork_server_holds_opacus_and_leaves_logging_alone():
    """A DP message forked from the warm process finds Opacus and fedmsk's samplers imported (0.6 s of
    CPU a message otherwise); Opacus' own logging.basicConfig does not stay behind to print every
    line twice."""
    probe = ("import logging, sys; import client.warm as w; w.preload(); "
             "from opacus.grad_sample import GradSampleModule; from shared.models.blocks import LearnedScale; "
             "print(sorted(m for m in ('opacus', 'client.grad_samplers', 'torch') if m in sys.modules), "
             "LearnedScale in GradSampleModule.GRAD_SAMPLERS, len(logging.getLogger().handlers))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert out.stdout.split("\n")[-2] == "['client.grad_samplers', 'opacus', 'torch'] True 0", out.stdout + out.stderr[-2000:]


def test_the_site_supernode_polls_and_heartbeats_at_fedmsks_intervals(monkeypatch):
    """client.supernode replaces Flower 1.41's hard-coded 3 s idle poll, 0.5 s reply poll and 30 s heartbeat."""
    import time

    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.fleet_http_connection as fleet
    import flwr.supernode.start_client_internal as loop

    import client.supernode as supernode

    for module, name in ((loop, "time"), (fleet, "HEARTBEAT_DEFAULT_INTERVAL"), (heartbeat, "HEARTBEAT_DEFAULT_INTERVAL")):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    supernode.apply_intervals(0.25, 0.05, 12.0)
    loop.time.sleep(3)
    loop.time.sleep(0.5)
    loop.time.sleep(7)
    assert slept == [0.25, 0.05, 7]
    assert fleet.HEARTBEAT_DEFAULT_INTERVAL == 12.0 and heartbeat.HEARTBEAT_DEFAULT_INTERVAL == 12.0
    assert loop.time.time is time.time
    with pytest.raises(ValueError, match="accepts 10"):
        supernode.apply_intervals(0.5, 0.1, 5.0)


def test_the_serverapp_pulls_replies_at_the_configured_interval(monkeypatch):
    """server.reply_poll: Flower's deployment grid sleeps 3 s between pulls; ours sleeps federation.reply_poll_s."""
    from types import SimpleNamespace

    from flwr.superlink.grid.http_grid import HttpGrid

    import server.reply_poll as reply_poll

    class FakeGrid(HttpGrid):
        def __init__(self) -> None:  # no SuperLink: replies arrive on the third pull
            self.pulls = 0

        def push_messages(self, messages):
            return ["m1", "m2"]

        def pull_messages(self, message_ids):
            self.pulls += 1
            if self.pulls < 3:
                return []
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=m)) for m in sorted(message_ids)]

    slept = []
    monkeypatch.setattr(reply_poll.time, "sleep", slept.append)
    grid = reply_poll.quick_replies(FakeGrid(), 0.2)
    replies = grid.send_and_receive([object(), object()], timeout=60)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m1", "m2"]
    assert slept == [0.2, 0.2] and grid.pulls == 3
    other = SimpleNamespace(send_and_receive=None)  # any other grid is left alone
    assert reply_poll.quick_replies(other, 0.2) is other


def test_simulations_in_memory_grid_pulls_replies_without_flowers_tenth_of_a_second():
    """server.reply_poll: in simulation a pull is a look-up in memory; Flower's 0.1 s wait between pulls was
    0.1 s a round, and the streamed aggregation (server.streaming) sleeps the grid's own interval."""
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    import server.reply_poll as reply_poll

    grid = InMemoryGrid(LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()))
    assert grid.pull_interval == 0.1  # Flower's
    assert reply_poll.quick_replies(grid, 0.2) is grid and grid.pull_interval == reply_poll.IN_MEMORY_POLL_S < 0.1


def test_packed_messages_carry_one_array_and_come_back_exactly(monkeypatch):
    """shared.packing: a model's state dict travels as one array (Flower moves each array as its own request)."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from shared.packing import pack_content, packed_arrays_mod, unpack_content

    rng = np.random.default_rng(0)
    arrays = {f"layer{i}.weight": rng.normal(size=(3, i + 1)).astype(np.float32) for i in range(20)}
    arrays["bn.num_batches_tracked"] = np.array(7, dtype=np.int64)
    arrays["half"] = rng.normal(size=(2, 2)).astype(np.float16)
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "config": ConfigRecord({"round": 1}), "metrics": MetricRecord({"num-examples": 5})})
    packed = pack_content(content)
    assert len(packed["arrays"]) == 1
    assert len(get_all_nested_objects(packed)) < len(get_all_nested_objects(content)) // 5
    back = unpack_content(packed)
    assert list(back["arrays"]) == list(arrays) and set(back) == {"arrays", "config", "metrics"}
    for name, value in arrays.items():
        got = back["arrays"][name].numpy()
        assert got.dtype == value.dtype and got.shape == value.shape and np.array_equal(got, value)
    assert unpack_content(content) is content  # an unpacked message passes untouched

    seen = {}

    def handler(msg, ctx):  # the ClientApp's handler sees the plain arrays; its reply leaves packed
        seen["names"] = list(msg.content["arrays"])
        return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 5})}), reply_to=msg)

    from flwr.supercore.task_identity import TaskIdentity

    for key, value in (("run_id", 1), ("node_id", 0), ("task_id", 0)):  # a Message needs a task's identity
        monkeypatch.setattr(TaskIdentity, f"_{key}", value)
    msg = Message(packed, dst_node_id=1, message_type="train")
    reply = packed_arrays_mod(msg, None, handler)
    assert seen["names"] == list(arrays) and len(reply.content["arrays"]) == 1
    assert np.array_equal(unpack_content(reply.content)["arrays"]["half"].numpy(), arrays["half"])


def test_join_refuses_a_heartbeat_the_server_would_refuse_before_starting_anything(consortium, capsys):
    from cli.main import main as fedmsk

    bundle = consortium.add_site("site_a")
    assert fedmsk(["join", str(bundle), "--heartbeat-s", "5"]) == 2
    out = capsys.readouterr()
    assert "--heartbeat-s 5.0: the server accepts 10-1800 s" in out.out + out.err
    assert not (bundle / "state").exists()  # no SuperNode was started
