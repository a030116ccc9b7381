"""Real deployment on 127.0.0.1: a SuperLink behind the nginx gateway and three SuperNodes, each a
separate process with TLS and site authentication (the consortium shared with
tests/test_deploy_failures.py, tests/deploy_helpers.py). Every process is stopped by the fixture."""

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
from client.supernode import check_flower_constants
from client.warm import WARM_LINE
from server.launch import launch
from server.provision import Consortium
from server.superlink import node_states, revoke_site
from shared.config import ConfigError
from deploy_helpers import COLD, SITES, TINY

pytestmark = pytest.mark.deploy


@pytest.fixture
def fed(deploy_consortium):
    return deploy_consortium


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

    never_added = fed.join("intruder", bundle=intruder_bundle, ca_certificate=fed.consortium.ca_cert, intervals=COLD)
    revoked = fed.join("site_revoked", intervals=COLD)
    with pytest.raises(ConfigError, match=r"site 'site_b' is already joined from .*site_b/state \(pid \d+\)"):
        fed.join("site_b", intervals=COLD)  # the running site_b holds its bundle's state folder
    # a key that is registered, without our CA (its own state folder: the running site_b keeps its own)
    wrong_ca = fed.join("site_b", ca_certificate=outsider.ca_cert, intervals=COLD, state_dir=tmp_path / "wrong_ca")
    deadline = time.monotonic() + 90
    for node in (never_added, revoked, wrong_ca):
        while node.supernode.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
    assert "[code: 2004]" in never_added.supernode.log_text() and "refused this site's key" in never_added.explain_exit()
    assert "[code: 2004]" in revoked.supernode.log_text() and "refused this site's key" in revoked.explain_exit()
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca.supernode.log_text() and "ca.crt" in wrong_ca.explain_exit()
    states = node_states(fed.server.home)
    assert states[fed.consortium.site("site_revoked").node_id] == "unregistered"
    assert {states[fed.consortium.site(name).node_id] for name in SITES} == {"online"}  # the real sites are unaffected
    assert "CERTIFICATE_VERIFY_FAILED" not in fed.site_nodes["site_b"].supernode.log_text()


def test_two_round_run_through_fedmsk_launch_writes_a_model(fed, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = fedmsk(["launch", "--dir", str(fed.consortium.root), "--app", str(fed.fedmsk_app),
                   *TINY, "rounds=2", f"run_dir={run_dir}"])
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
    killed = time.monotonic()
    os.kill(victim.supernode.pid, signal.SIGKILL)
    runner.join(timeout=300)
    held = time.monotonic() - killed
    victim.stop()
    assert box["result"].ok, box["result"].status
    assert json.loads(out.read_text()) == [[1.0, 1.0, 1.0]]
    assert "Received 2 results" in fed.run_log(box["result"].run_id)
    # the site declared a 10 s heartbeat (client.supernode): gone after two missed ones, not Flower's 2 x 30 s
    assert held < 55, held

    fed.site_nodes["site_a"] = fed.join("site_a", max_retries=None)
    fed.wait_online(3, timeout=60)


def test_the_sites_run_with_fedmsk_intervals_and_warm_clientapps(fed):
    """What the round-overhead fix changes is in effect at the running sites (client.supernode, client.warm)."""
    check_flower_constants()  # the Flower constants client.supernode overrides are still where it expects them
    node = fed.site_nodes["site_b"]
    argv = node.supernode.argv
    assert argv[argv.index("--poll-s") + 1] == "0.5" and argv[argv.index("--heartbeat-s") + 1] == "10.0"
    assert "--warm" in node.executor.argv
    env = node._env()
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    # every message of the runs above ran in a process forked from the warm fork server, not a new interpreter
    import psutil

    executor = psutil.Process(node.executor.pid)
    forkservers = [p for p in executor.children() if "forkserver" in " ".join(p.cmdline())]
    assert len(forkservers) == 1
    def started(log: str) -> int:
        """Flower's line for each message's process, from Flower's own log handler (a root-logger handler, such as
        the one Opacus' import sets up with logging.basicConfig, would repeat it as ``...:INFO:Start ...``)."""
        return sum(1 for line in log.splitlines() if "Start `flwr-clientapp` process" in line and ":INFO:" not in line)

    if started(node.executor.log_text()) == 0:  # run on its own: give the site a message first
        assert launch(fed.consortium, ["min-nodes=2"], app_dir=fed.toy, stream=False, timeout_s=240).ok
    log = node.executor.log_text()
    assert started(log) >= 1 and log.count(WARM_LINE) == started(log), (started(log), log.count(WARM_LINE))
