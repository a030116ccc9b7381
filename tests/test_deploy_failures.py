"""Deployment failures that must be loud, on real processes on 127.0.0.1 (the consortium shared with
tests/test_deploy_federation.py, tests/deploy_helpers.py): a run nobody trains in, a killed executor,
a revoked running site, a SuperLink that disappears under `fedmsk launch` (restarted afterwards, and
the sites come back by themselves). Every process is stopped by the fixture."""

import os
import re
import signal
import sqlite3
import threading
import time

import pytest

import server.launch as launch_module
from cli.main import main as fedmsk
from client.join import REVOKED, SiteNode, load_join
from server.launch import launch
from server.superlink import CONNECTION, revoke_site, sync_site_keys
from deploy_helpers import COLD, SITES, TINY, free_port

pytestmark = pytest.mark.deploy


@pytest.fixture
def fed(deploy_consortium):
    return deploy_consortium


def _unreachable_bundle(tmp_path):
    """A site bundle of a consortium whose server nobody runs (an empty clinical.csv as its data)."""
    from server.provision import Consortium

    c = Consortium(tmp_path / "c")
    c.init(f"127.0.0.1:{free_port()}")  # nobody listens there
    bundle = c.add_site("site_a")
    (bundle / "site.yaml").write_text(re.sub(r"(?m)^data_dir:.*$", f"data_dir: {tmp_path}", (bundle / "site.yaml").read_text()))
    (tmp_path / "clinical.csv").write_text("patient_id\n")
    return bundle


def test_join_reads_only_this_starts_log(tmp_path):
    """An earlier start's cause (a refused key, in the appended log) is not this start's."""
    bundle = _unreachable_bundle(tmp_path)
    logs = bundle / "state" / "logs"
    logs.mkdir(parents=True)
    (logs / "supernode.log").write_text("ERROR: SuperNode refused [code: 2004]\nExit Code: 2004\n")  # yesterday's start
    node = SiteNode(load_join(bundle), runtime_port=free_port(), max_retries=0).start()
    try:
        assert node.wait(poll=0.2) != 0
    finally:
        node.stop()
    reason = node.explain_exit()
    assert "could not connect" in reason and "refused this site's key" not in reason, reason


def test_a_second_join_from_one_bundle_is_refused_until_the_first_stops(tmp_path):
    """Two SuperNodes of one site would share its state folder (the Runtime API secret, the logs)."""
    from shared.config import ConfigError

    bundle = _unreachable_bundle(tmp_path)
    first = SiteNode(load_join(bundle), runtime_port=free_port(), max_retries=0, intervals=COLD).start()
    try:
        secret = (bundle / "state" / "superexec.secret").read_bytes()
        with pytest.raises(ConfigError, match=rf"site 'site_a' is already joined from .*state \(pid {os.getpid()}\)"):
            SiteNode(load_join(bundle), runtime_port=free_port(), max_retries=0, intervals=COLD).start()
        assert (bundle / "state" / "superexec.secret").read_bytes() == secret  # the running one's secret is untouched
    finally:
        first.stop()
    again = SiteNode(load_join(bundle), runtime_port=free_port(), max_retries=0, intervals=COLD).start()  # the lock went with stop()
    again.stop()


def test_a_run_in_which_every_site_refuses_fails_and_names_the_sites(fed, tmp_path, capsys):
    # The bundles' own policy turns DP on at every site; a batch-coupled aux loss cannot be trained
    # under DP-SGD, so each site refuses round 1 (named explicitly: the default aux loss may change).
    run_dir = tmp_path / "run"
    code = fedmsk(["launch", "--dir", str(fed.consortium.root), "--app", str(fed.fedmsk_app), "--no-stream", *TINY,
                   "rounds=3", "model.aux_loss=supcon", "model.aux_weight=0.5", "strategy.min_train_nodes=3",
                   "strategy.min_available_nodes=3", f"run_dir={run_dir}"])
    out = capsys.readouterr().out
    assert code == 1, out[-3000:]
    assert "finished:failed" in out
    stop = next(line for line in out.splitlines() if "no site trained" in line)
    assert "round 1" in stop and "site_a, site_b, site_c" in stop and "couples the patients of a batch" in stop, out[-3000:]
    assert "resume=true" in out
    events = (run_dir / "events.jsonl").read_text()
    assert all(f'"site": "{name}"' in events for name in SITES) and "node-" not in events
    assert "DP: no site trained" in (run_dir / "summary.md").read_text()


def test_a_killed_executor_is_named_and_replaced(fed, tmp_path):
    dead = fed.server.executor
    os.kill(dead.pid, signal.SIGKILL)
    dead.proc.wait(timeout=10)
    events = fed.server.supervise()
    assert len(events) == 1 and "executor (SuperExec) died (exit code -9)" in events[0] and "Restarted" in events[0]
    assert fed.server.executor is not dead and fed.server.executor.alive()
    # Another writer holds state.db's write lock for 12 s while the run is submitted and taken: with
    # Flower's own 5 s busy timeout the SuperLink answers "database is locked"; fedmsk waits longer.
    locker = sqlite3.connect(fed.consortium.root / "state.db", isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN IMMEDIATE")
    release = threading.Timer(12.0, lambda: locker.execute("ROLLBACK"))
    release.start()
    try:
        result = launch(fed.consortium, ["min-nodes=2"], app_dir=fed.toy, stream=False, timeout_s=240)
    finally:
        release.join()
        locker.close()
    assert result.ok, result.status  # the next run is taken by the new executor, not left pending
    assert "database is locked" not in fed.server.superlink.log_text()


def test_a_site_revoked_while_running_stops_non_zero_and_says_so(fed):
    # a site of this test's own: the shared ones stay registered
    fed.add_site("site_d", fed.data / "site_b")
    assert any("registered site_d" in change for change in sync_site_keys(fed.consortium, fed.server.home))
    node = fed.join("site_d", intervals=COLD)
    fed.wait_online(4)
    revoke_site(fed.consortium, "site_d", fed.server.home)
    code = node.wait(poll=0.5)  # Flower notices at the next heartbeat or poll, exits 0 "gracefully"
    assert code != 0
    assert REVOKED in node.explain_exit()
    again = fed.join("site_d", intervals=COLD)  # a revoked key stays refused at the next start
    assert again.wait(poll=0.5) != 0 and "refused this site's key" in again.explain_exit()


def test_launch_gives_up_on_its_deadline_and_when_the_superlink_goes(fed, tmp_path, capsys, monkeypatch):
    base = ["launch", "--dir", str(fed.consortium.root), "--app", str(fed.toy), "--no-stream"]
    # three sites online, the run asks for nine: it can never finish
    code = fedmsk([*base, "--timeout", "3", "min-nodes=9", f"run_dir={tmp_path / 'a'}"])
    out = capsys.readouterr().out
    assert code == 1 and "did not finish within 3 s" in out and "stopped it" in out, out
    monkeypatch.setattr(launch_module, "UNREACHABLE_S", 3.0)
    box = {}

    def run_launch():
        box["code"] = fedmsk([*base, "min-nodes=9", f"run_dir={tmp_path / 'b'}"])

    def runs() -> int:
        return len(fed.flwr("ls", CONNECTION).get("runs", []))

    before = runs()
    runner = threading.Thread(target=run_launch)
    runner.start()
    deadline = time.monotonic() + 120
    while runs() == before and time.monotonic() < deadline:  # submitted (building the app takes a while under load)
        time.sleep(1.0)
    time.sleep(2.0)  # and waiting for sites
    marks = fed.log_marks()
    fed.server.superlink.signal_group(signal.SIGKILL)
    runner.join(timeout=120)
    out = capsys.readouterr()
    assert box["code"] == 1, out.out[-2000:]
    assert "stopped answering" in out.out and f"resume=true run_dir={tmp_path / 'b'}" in out.out, out.out
    assert "Traceback" not in out.out + out.err
    # `fedmsk server` restarts the SuperLink (same state.db) and the sites reconnect by themselves
    events = fed.server.supervise()
    assert any("SuperLink died" in e and "Restarted" in e for e in events), events
    fed.wait_reconnected(marks, timeout=120)
    assert all(fed.site_nodes[name].supernode.alive() for name in SITES)
