"""Alias history, rollback and retention on the real S3 server (rclone)."""

from __future__ import annotations

import json
import threading

import pytest

from loraflow.errors import StorageError
from loraflow.registry import alias_history, get_alias, list_versions, publish_adapter, pull_adapter
from loraflow.registry.catalog import complete_versions, open_registry


def _publish(settings, adapter_dir, name: str, count: int, aliases=()) -> list[str]:
    return [publish_adapter(settings, adapter_dir, name=name, aliases=list(aliases)).version for _ in range(count)]


def _args(settings) -> list[str]:
    storage = settings.storage
    return ["--set", f"storage.endpoint_url={storage.endpoint_url}", "--set", f"storage.bucket={storage.bucket}"]


def test_history_records_every_move_and_rollback_moves_back(s3_settings, tiny_adapter_dir, cli):
    v1, v2, v3 = _publish(s3_settings, tiny_adapter_dir, "h", 3, aliases=["latest"])
    args = _args(s3_settings)
    for version, reason in ((v1, "first"), (v2, "better on the new reviews"), (v3, "")):
        assert cli("promote", "h", version, "--alias", "champion", "--reason", reason, *args)[0] == 0

    code, out, err = cli("history", "h", "--json", *args)
    assert code == 0, err
    events = json.loads(out)
    assert [(e["from"], e["to"]) for e in events] == [(v2, v3), (v1, v2), (None, v1)]  # newest first
    assert [e["seq"] for e in events] == [3, 2, 1]
    assert events[1]["reason"] == "better on the new reviews" and events[0]["reason"] == "promoted by hand"
    assert all("@" in e["actor"] and e["at"] for e in events)  # the CLI user, user@host
    # `latest` moved on every publish, recorded as such.
    latest = alias_history(s3_settings, "h", "latest")
    assert [e["to"] for e in latest] == [v3, v2, v1] and {e["reason"] for e in latest} == {"published"}

    code, out, _ = cli("history", "h", *args)
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["WHEN", "FROM", "TO", "ACTOR", "REASON"]
    assert v3 in lines[1] and v1 in lines[3] and len(lines) == 4

    code, out, err = cli("rollback", "h", *args)
    assert code == 0, err
    assert out.strip() == f"h@champion: {v3} -> {v2} (rolled back)"
    assert get_alias(s3_settings, "h", "champion") == v2
    newest = alias_history(s3_settings, "h", "champion", limit=1)[0]
    assert (newest["from"], newest["to"], newest["reason"]) == (v3, v2, f"rollback from {v3}")

    assert cli("rollback", "h", "--to", v1, "--reason", "v2 misbehaves", *args)[0] == 0
    assert get_alias(s3_settings, "h", "champion") == v1
    assert alias_history(s3_settings, "h", "champion", limit=1)[0]["reason"] == "v2 misbehaves"
    assert len(alias_history(s3_settings, "h", "champion")) == 5

    # Nothing to go back to: one line naming the alias, non-zero exit.
    code, _, err = cli("rollback", "h", "--alias", "first", *args)
    assert code != 0 and "has no alias 'first'" in err and len(err.strip().splitlines()) == 1
    assert cli("promote", "h", v1, "--alias", "solo", *args)[0] == 0
    code, _, err = cli("rollback", "h", "--alias", "solo", *args)
    assert code == 2 and "no previous version" in err


def test_history_shows_a_move_whose_record_was_lost(s3_settings, tiny_adapter_dir):
    """A writer that died between moving the alias and writing its record: the alias object itself
    remembers the move, so the history still shows it."""
    from loraflow.registry import set_alias
    from loraflow.registry.history import history_prefix

    v1, v2 = _publish(s3_settings, tiny_adapter_dir, "lost", 2)
    set_alias(s3_settings, "lost", "champion", v1, actor="flow-run:abc", reason="gate")
    set_alias(s3_settings, "lost", "champion", v2, actor="flow-run:def", reason="gate")
    store, layout = open_registry(s3_settings, "lost")
    newest = max(o["Key"] for o in store.list(history_prefix(layout, "champion")))
    store.delete([newest])
    events = alias_history(s3_settings, "lost", "champion")
    assert [(e["from"], e["to"], e["actor"]) for e in events] == [(v1, v2, "flow-run:def"), (None, v1, "flow-run:abc")]
    assert events[0]["recovered_from_alias"]


def test_retention_keeps_aliased_recent_and_recent_champions_readers_see_whole_versions(
        s3_server, s3_settings, tiny_adapter_dir, tmp_path, cli):
    from loraflow.registry import set_alias

    v = _publish(s3_settings, tiny_adapter_dir, "r", 7, aliases=["latest"])
    set_alias(s3_settings, "r", "champion", v[1])
    set_alias(s3_settings, "r", "champion", v[2])
    set_alias(s3_settings, "r", "champion", v[3])
    set_alias(s3_settings, "r", "canary", v[4])
    args = [*_args(s3_settings), "--keep-last", "1", "--keep-champions", "1"]

    # keep: v6 (newest, latest), v4 (canary), v3 (champion), v2 (held champion in its last move).
    code, out, err = cli("gc", "r", "--dry-run", *args)
    assert code == 0, err
    assert out.splitlines()[0] == "would delete 3 version(s), kept 4"
    assert {line.split()[1] for line in out.splitlines() if line.startswith("  - ")} == {v[0], v[1], v[5]}
    assert f"  = {v[2]}  (held champion in its last 1 moves)" in out
    assert [r["version"] for r in list_versions(s3_settings, "r")] == v  # nothing deleted
    code, out, _ = cli("gc", "r", "--dry-run", "--keep-last", "100", *_args(s3_settings))
    assert out.splitlines()[0] == "would delete 0 version(s), kept 7"

    # For real, while another thread keeps pulling every listed version.
    stop, seen, refused = threading.Event(), set(), []

    def reader() -> None:
        store, layout = open_registry(s3_settings, "r")
        while not stop.is_set():
            for version in complete_versions(store, layout):
                try:
                    seen.add(pull_adapter(f"r=={version}", settings=s3_settings, dest=tmp_path / "cache").name)
                except StorageError as exc:  # deleted between the listing and the pull
                    refused.append(str(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        code, out, err = cli("gc", "r", *args)
    finally:
        stop.set()
        thread.join(60)
    assert code == 0, err
    assert out.splitlines()[0] == "deleted 3 version(s), kept 4"
    survivors = [v[2], v[3], v[4], v[6]]
    assert [r["version"] for r in list_versions(s3_settings, "r")] == survivors
    bucket_dir = s3_server.root / s3_settings.storage.bucket / "adapters" / "r" / "versions"
    assert {p.parent.name for p in bucket_dir.glob("*/*")} == set(survivors)  # no half versions left
    assert all("does not exist" in msg or "missing" in msg for msg in refused), refused
    for version in seen:  # every pull that succeeded placed a whole, verified version
        files = {p.name for p in (tmp_path / "cache" / "r" / version).iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= files, files
    assert sorted(p.name for p in (tmp_path / "cache" / "r").iterdir()) == sorted(seen)
    with pytest.raises(StorageError, match="does not exist|no version"):
        pull_adapter(f"r=={v[0]}", settings=s3_settings, dest=tmp_path / "other")

    code, out, _ = cli("gc", "r", *args)  # idempotent
    assert out.splitlines()[0] == "deleted 0 version(s), kept 4"


def _server_events(api_url: str, resource_id: str, want: int, timeout: float = 60) -> list[dict]:
    """Events about one resource as the Prefect server stored them (it persists them in the background)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        resp = httpx.post(f"{api_url}/events/filter", json={
            "filter": {"resource": {"id": [resource_id]}, "order": "ASC"}, "limit": 50}, timeout=10)
        resp.raise_for_status()
        found = resp.json()["events"]
        if len(found) >= want or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_registry_changes_arrive_as_prefect_events(prefect_server, s3_settings, tiny_adapter_dir, cli, monkeypatch):
    """`loraflow publish | promote | rollback` against a real Prefect server: one event each, on
    resource loraflow.adapter.NAME, with the version and metrics in the payload."""
    from loraflow import events

    from prefect.settings import PREFECT_API_URL, temporary_settings

    args = _args(s3_settings)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # no Prefect API: nothing sent, nothing breaks
        assert not events.api_configured()
        assert cli("publish", str(tiny_adapter_dir), "--name", "quiet", "--no-alias", *args)[0] == 0

    monkeypatch.setenv("PREFECT_API_URL", prefect_server.api_url)
    assert events.api_configured()
    versions = []
    for _ in range(2):
        code, out, err = cli("publish", str(tiny_adapter_dir), "--name", "ev", "--no-alias",
                             "--extra", '{"note": "events test"}', *args)
        assert code == 0, err
        versions.append(out.split()[0].split("==")[1])
    for version in versions:
        assert cli("promote", "ev", version, "--alias", "champion", "--reason", "test", *args)[0] == 0
    assert cli("rollback", "ev", *args)[0] == 0

    got = _server_events(prefect_server.api_url, "loraflow.adapter.ev", want=5)
    names = [e["event"] for e in got]
    assert names == ["loraflow.adapter.published"] * 2 + ["loraflow.adapter.promoted"] * 2 + \
        ["loraflow.adapter.rolled-back"], names
    assert [e["payload"]["version"] for e in got] == [versions[0], versions[1], versions[0], versions[1], versions[0]]
    rolled = got[-1]["payload"]
    assert rolled["alias"] == "champion" and rolled["previous"] == versions[1]
    assert rolled["reason"] == f"rollback from {versions[1]}" and isinstance(rolled["metrics"], dict)
    assert got[2]["payload"]["reason"] == "test" and got[2]["resource"]["prefect.resource.name"] == "ev"
    assert _server_events(prefect_server.api_url, "loraflow.adapter.quiet", want=1, timeout=2) == []


def test_readme_automation_example_runs(prefect_server, monkeypatch):
    """The README's automation snippet, exactly as printed, against a real Prefect server."""
    import asyncio
    from pathlib import Path

    from prefect.client.orchestration import get_client

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("# loraflow: automation example")
    code = readme[start:readme.index("```", start)]
    monkeypatch.setenv("PREFECT_API_URL", prefect_server.api_url)
    exec(compile(code, "README.md", "exec"), {})

    async def read():
        async with get_client() as client:
            return await client.read_automations_by_name("loraflow: champion moved")

    [automation] = asyncio.run(read())
    assert automation.trigger.expect == {"loraflow.adapter.promoted", "loraflow.adapter.rolled-back"}
    assert automation.actions[0].type == "send-notification"


def test_versions_show_the_gate_verdict_and_intervals(s3_settings, tiny_adapter_dir, cli):
    from loraflow.promotion import decide

    tokens = [50, 80, 120, 60, 90, 70]
    base = [4.0, 3.5, 4.2, 3.9, 4.4, 3.7]
    decision = decide({"document_losses": [x - 0.2 for x in base], "base_document_losses": base,
                       "document_tokens": tokens, "adapter_ppl": 40.0, "base_ppl": 50.0})
    args = _args(s3_settings)
    assert cli("publish", str(tiny_adapter_dir), "--name", "g", *args)[0] == 0  # from before the gate
    code, _, err = cli("publish", str(tiny_adapter_dir), "--name", "g", "--extra",
                       json.dumps({"gate": decision.to_dict()}), *args)
    assert code == 0, err
    code, out, _ = cli("versions", "g", *args)
    header, old, new = out.splitlines()
    assert "GATE" in header.split() and " - " in old
    low, mid, high = decision.vs_base["ppl_ratio"]
    # The gate's bootstrap counts chunks; these metrics name no document count.
    assert f"promote vs base {mid:.3f} [{low:.3f},{high:.3f}] 6 chunks" in new
    rows = json.loads(cli("versions", "g", "--json", *args)[1])
    assert rows[1]["gate"]["verdict"] == "promote" and rows[1]["gate"]["vs_base"]["documents"] == 6
    assert rows[0]["gate"] is None


def test_versions_and_the_run_summary_say_documents_and_chunks_apart():
    from loraflow.cli.registry import _gate
    from loraflow.cli.run import format_summary

    gate = {"verdict": "promote", "documents": 69, "tokens": 12345}
    assert _gate(gate, 50).endswith("promote 50 documents (69 chunks)")
    assert _gate(gate, 69).endswith("69 documents") and _gate(gate).endswith("69 chunks")
    summary = format_summary({"name": "a", "version": "v", "promoted": True, "reason": "r", "uri": "s3://b/a/",
                              "pull_command": "loraflow pull a==v", "gate": gate,
                              "metrics": {"eval_documents": 50, "base_ppl": 2.0, "adapter_ppl": 1.5}})
    assert "  evaluation   50 documents (69 chunks), 12,345 tokens" in summary.splitlines()
