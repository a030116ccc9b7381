"""Real deployment on 127.0.0.1: a SuperLink behind the nginx gateway and three SuperNodes, each a
separate process with TLS and site authentication. Every process is stopped by the fixture."""

import json
import os
import signal
import ssl
import threading
import time

import httpx
import pytest

from cli.main import main as fedmsk
from client.approval import ApprovedBuilds, fab_sha256
from client.join import load_join
from server.launch import launch
from server.provision import Consortium
from server.superlink import node_states, revoke_site
from shared.config import compose
from simulation.synth import write_federation
from deploy_helpers import LocalFederation, copy_fedmsk_app, require_nginx, write_toy_app

pytestmark = pytest.mark.deploy

SITES = ["site_a", "site_b", "site_c"]
TINY = [
    "num_sites=3",
    "synth.patients_per_site=[60,50,50]",
    "synth.image_size=48",
    "task.image_size=[32,32]",
    "federation.local_epochs=1",
    "model.width=8",
    "model.embed_dim=32",
    "model.proj_dim=16",
    "model.aux_loss=prototype",  # per-sample: the sites' own privacy policy (DP on) refuses batch-coupled losses
    "strategy.min_train_nodes=2",
    "strategy.min_evaluate_nodes=2",
    "strategy.min_available_nodes=2",
    "strategy.round_timeout_s=300",
]


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    require_nginx()
    root = tmp_path_factory.mktemp("deploy")
    data = root / "sites"
    write_federation(compose(TINY + [f"data_root={data}"]))
    f = LocalFederation(root)
    f.fedmsk_app = copy_fedmsk_app(root / "fedmsk_app")
    f.toy = write_toy_app(root / "toy")
    f.toy_changed = write_toy_app(root / "toy_changed", variant="one byte")
    try:
        for name in SITES:
            # site_c approved a build of the toy app that differs from the one sent
            toy = f.toy_changed if name == "site_c" else f.toy
            f.add_site(name, data / name, approve=[f.fedmsk_app, toy])
        f.add_site("site_revoked", data / "site_a")
        f.start_server()
        f.site_nodes = {name: f.join(name) for name in SITES}
        f.wait_online(3)
        yield f
    finally:
        f.stop()


def test_control_api_is_refused_at_the_site_facing_address(fed):
    ca = str(fed.consortium.ca_cert)
    public = f"https://127.0.0.1:{fed.public_port}"
    for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/pull-task-input",
                 "/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/control/list-runs", "/v1/fleet/x%2f..%2f..%2fcontrol/list-runs"):
        r = httpx.post(public + path, verify=ca, content=b"", timeout=10)
        assert r.status_code == 403, (path, r.status_code)
    # the same Control request on the SuperLink's own (local) port is served: the proxy is what refuses it
    local = httpx.post(f"https://127.0.0.1:{fed.local_port}/v1/control/list-runs", verify=ca, content=b"", timeout=10)
    assert local.status_code != 403
    # Fleet requests pass through (Flower itself answers, here refusing an unsigned request)
    fleet = httpx.post(public + "/v1/fleet/get-run", verify=ca, content=b"", timeout=10)
    assert fleet.status_code != 403
    # and the TLS certificate a site sees is the consortium's
    with pytest.raises(httpx.ConnectError):
        httpx.post(public + "/v1/fleet/get-run", verify=ssl.create_default_context(), timeout=10)


def test_refused_supernodes_say_why(fed, tmp_path):
    outsider = Consortium(tmp_path / "other")
    outsider.init(f"127.0.0.1:{fed.public_port}")
    intruder_bundle = outsider.add_site("intruder")
    (intruder_bundle / "site.yaml").write_text((fed.consortium.bundle_dir("site_a") / "site.yaml").read_text())
    message = revoke_site(fed.consortium, "site_revoked", fed.server.home)
    assert "--rotate" in message

    never_added = fed.join("intruder", bundle=intruder_bundle, ca_certificate=fed.consortium.ca_cert)
    revoked = fed.join("site_revoked")
    wrong_ca = fed.join("site_b", ca_certificate=outsider.ca_cert)  # a key that is registered, without our CA
    deadline = time.monotonic() + 90
    for node in (never_added, revoked, wrong_ca):
        while node.supernode.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
    assert "[code: 2004]" in never_added.supernode.log_text() and "refused this site's key" in never_added.explain_exit()
    assert "[code: 2004]" in revoked.supernode.log_text() and "refused this site's key" in revoked.explain_exit()
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca.supernode.log_text() and "ca.crt" in wrong_ca.explain_exit()
    states = node_states(fed.server.home)
    assert states[fed.consortium.site("site_revoked").node_id] == "unregistered"
    assert sum(s == "online" for s in states.values()) == 3  # the real sites are unaffected


def test_two_round_run_through_fedmsk_launch_writes_a_model(fed, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # evaluation rounds off: each exchange starts a fresh ClientApp process per site (~10 s of CPU)
    code = fedmsk(["launch", "--dir", str(fed.consortium.root), "--app", str(fed.fedmsk_app),
                   *TINY, "rounds=2", "strategy.fraction_evaluate=0.0", f"run_dir={run_dir}"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "finished:completed" in out
    assert (run_dir / "final_model.pt").is_file() and (run_dir / "checkpoints" / "round_0002.pt").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["phase"] == "train" and r["site"] != "global"]
    assert {r["site"] for r in trained} == set(SITES)
    # each site trained under its own bundle policy (DP on), whatever the run proposed (privacy off)
    assert all(r["dp"] == 1.0 and 0 < r["epsilon"] <= 8.0 for r in trained)


def test_a_site_refuses_an_unapproved_build_and_the_round_goes_on(fed, tmp_path):
    out = tmp_path / "toy.json"
    result = launch(fed.consortium, ["min-nodes=3", f"out={out}"], app_dir=fed.toy, stream=False, timeout_s=240)
    digest, _ = fab_sha256(fed.toy)
    assert result.ok and result.fab_hash == digest
    assert json.loads(out.read_text()) == [[1.0, 1.0, 1.0]]
    refusal = f"refusing app build sha256={digest}: not approved at this site"
    assert refusal in fed.site_nodes["site_c"].executor.log_text()
    assert digest != fab_sha256(fed.toy_changed)[0]  # the build it approved differs by a byte
    for name in ("site_a", "site_b"):
        assert f"app build sha256={digest} is approved" in fed.site_nodes[name].executor.log_text()
    assert "Received 2 results and 1 failures" in fed.run_log(result.run_id)


def test_a_site_killed_mid_round_does_not_fail_the_run_and_can_rejoin(fed, tmp_path):
    # site_c now approves the toy build too (no restart needed), so two healthy sites remain
    ApprovedBuilds(load_join(fed.consortium.bundle_dir("site_c")).approved_builds).approve(fed.toy)
    victim = fed.site_nodes["site_a"]
    started = victim.executor.log_text().count("Start `flwr-clientapp` process")
    out = tmp_path / "toy.json"
    box = {}
    runner = threading.Thread(target=lambda: box.setdefault(
        "result", launch(fed.consortium, ["min-nodes=2", "sleep=6", f"out={out}"], app_dir=fed.toy, stream=False, timeout_s=300)))
    runner.start()
    deadline = time.monotonic() + 60
    while victim.executor.log_text().count("Start `flwr-clientapp` process") == started and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # the site is now training (6 s)
    os.kill(victim.supernode.pid, signal.SIGKILL)
    runner.join(timeout=300)
    victim.stop()
    assert box["result"].ok, box["result"].status
    assert json.loads(out.read_text()) == [[1.0, 1.0, 1.0]]
    assert "Received 2 results" in fed.run_log(box["result"].run_id)

    fed.site_nodes["site_a"] = fed.join("site_a")
    fed.wait_online(3, timeout=60)
