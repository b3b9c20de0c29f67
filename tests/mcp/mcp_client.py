"""Tanjiren's MCP surface, driven by the official MCP Python SDK (`mcp` on PyPI).

Run by the Rust test `processes::mcp` (services/tanjiren/tests/processes/mcp.rs),
which starts the services, a worker and the gateway and passes everything here in
MCP_* environment variables:

  MCP_TRANSPORT        http | stdio
  MCP_MODE             auto (the SDK's default: 2026-07-28) | legacy (initialize, 2025-11-25)
  MCP_URL              the gateway's /mcp (http)
  MCP_STDIO            JSON: {"command": ..., "args": [...], "env": {...}} without a token (stdio)
  MCP_OPERATE_TOKEN    a member token with the scope mcp:operate
  MCP_READ_TOKEN       a member token with the scope mcp:read
  MCP_OTHER_TOKEN      an mcp:operate token of another organisation
  MCP_WORKSTATION      the name of a workstation with a running worker
  MCP_APPROVE_TASK / MCP_APPROVE_TOKEN, MCP_REJECT_TASK / MCP_REJECT_TOKEN
                       tasks doctrine holds, with approval tokens a person minted

Each check raises on failure; the script prints one line per check and exits 0
only when all passed.
"""

import json
import os
import sys
import uuid
import warnings

import anyio
import httpx2
import mcp_types as types
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

warnings.simplefilter("ignore")  # resources/subscribe is deprecated in the SDK (legacy mode uses it)

TRANSPORT = os.environ["MCP_TRANSPORT"]
MODE = os.environ.get("MCP_MODE", "auto")
WS = os.environ["MCP_WORKSTATION"]
EIGHT = [
    "list_tasks", "get_task", "create_task", "approve_task",
    "reject_task", "cancel_task", "retry_task", "add_task_artifact",
]
EXTRAS = ["list_workstations", "get_task_logs", "list_artifacts", "get_artifact", "list_investigations", "get_investigation",
          "create_investigation", "close_investigation", "list_pending_approvals", "get_runtime_overview"]


def log(msg: str) -> None:
    print(f"[{TRANSPORT}/{MODE}] {msg}", flush=True)


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


def server_for(token: str):
    if TRANSPORT == "http":
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(30, read=120))
        return streamable_http_client(os.environ["MCP_URL"], http_client=http)
    spec = json.loads(os.environ["MCP_STDIO"])
    env = dict(spec["env"], TANJIREN_TOKEN=token)
    return StdioServerParameters(command=spec["command"], args=spec["args"], env=env)


def client(token: str, on_message=None) -> Client:
    return Client(server_for(token), mode=MODE, message_handler=on_message)


async def call(c: Client, name: str, args: dict):
    """A tool call that must succeed; returns its structured content."""
    r = await c.call_tool(name, args)
    check(not r.is_error, f"{name} failed: {r.structured_content or r.content}")
    check(isinstance(r.structured_content, dict), f"{name}: no structuredContent")
    return r.structured_content


async def call_error(c: Client, name: str, args: dict, code: str) -> str:
    """A tool call that must fail as a tool result with wire error `code`."""
    r = await c.call_tool(name, args)
    check(r.is_error is True, f"{name} should have failed with {code}: {r.structured_content}")
    err = (r.structured_content or {}).get("error", {})
    check(err.get("code") == code, f"{name}: expected {code}, got {err}")
    return err.get("message", "")


async def refused(request, what: str) -> None:
    """`request` (an SDK call) must fail with a protocol or HTTP error."""
    try:
        r = await request
    except Exception as e:  # noqa: BLE001 - any refusal the SDK raises
        log(f"{what}: refused ({type(e).__name__}: {e})")
        return
    raise AssertionError(f"{what} succeeded: {r}")


async def read_json(c: Client, uri: str) -> dict:
    r = await c.read_resource(uri)
    check(len(r.contents) == 1 and r.contents[0].mime_type == "application/json", f"{uri}: one JSON content")
    return json.loads(r.contents[0].text)


async def wait_status(c: Client, task_id: str, statuses: set, seconds: float = 60) -> dict:
    with anyio.fail_after(seconds):
        while True:
            t = await read_json(c, f"tanjiren://tasks/{task_id}")
            if t["status"] in statuses:
                return t
            await anyio.sleep(0.2)


async def surface(c: Client) -> None:
    want = "2025-11-25" if MODE == "legacy" else "2026-07-28"
    check(c.protocol_version == want, f"protocol {c.protocol_version}, wanted {want}")
    check(c.server_info.name == "tanjiren", f"server {c.server_info}")
    tools = {t.name: t for t in (await c.list_tools()).tools}
    for name in EIGHT + EXTRAS:
        check(name in tools, f"tool {name} listed")
        t = tools[name]
        check(t.input_schema.get("type") == "object", f"{name}: input schema is an object")
        check((t.output_schema or {}).get("type") == "object", f"{name}: output schema is an object")
        check(t.annotations is not None and t.annotations.title, f"{name}: annotations with a title")
    check(tools["list_tasks"].annotations.read_only_hint is True, "list_tasks is read-only")
    check(tools["cancel_task"].annotations.destructive_hint is True, "cancel_task is destructive")
    check(tools["create_task"].annotations.read_only_hint is False, "create_task is not read-only")
    check("command" in json.dumps(tools["create_task"].input_schema), "create_task's schema describes command")
    resources = [r.uri for r in (await c.list_resources()).resources]
    check(resources == ["tanjiren://tasks/runtime-overview"], f"resources {resources}")
    templates = [t.uri_template for t in (await c.list_resource_templates()).resource_templates]
    check(templates == ["tanjiren://tasks/{id}"], f"templates {templates}")
    log(f"surface: {len(tools)} tools, protocol {c.protocol_version}")


async def subscribe_until_done(c: Client, task_id: str, updates: list, legacy_updated) -> dict:
    """Subscribes to the task's resource and waits, by its notifications, until it ends."""
    uri = f"tanjiren://tasks/{task_id}"
    terminal = {"completed", "failed", "cancelled"}
    if c.protocol_version == "2026-07-28":
        async with c.listen(resource_subscriptions=[uri]) as sub:
            check(uri in (sub.honored.resource_subscriptions or []), f"listen honoured {uri}: {sub.honored}")
            with anyio.fail_after(60):
                # The task may have ended before the subscription: read once, then wait.
                t = await read_json(c, uri)
                if t["status"] in terminal:
                    return t
                async for event in sub:
                    updates.append(event)
                    t = await read_json(c, uri)
                    if t["status"] in terminal:
                        return t
    await c.subscribe_resource(uri)
    with anyio.fail_after(60):
        t = await read_json(c, uri)
        while t["status"] not in terminal:
            await legacy_updated.wait()
            legacy_updated.clear() if hasattr(legacy_updated, "clear") else None
            updates.append(uri)
            t = await read_json(c, uri)
    await c.unsubscribe_resource(uri)
    return t


class Flag:
    """An anyio event that can be re-armed."""

    def __init__(self):
        self.event = anyio.Event()

    def set(self):
        self.event.set()

    async def wait(self):
        await self.event.wait()

    def clear(self):
        self.event = anyio.Event()


async def operate_flow() -> None:
    updated = Flag()

    async def on_message(msg):
        if isinstance(msg, types.ResourceUpdatedNotification) and MODE == "legacy":
            updated.set()

    async with client(os.environ["MCP_OPERATE_TOKEN"], on_message) as c:
        await surface(c)

        stations = await call(c, "list_workstations", {})
        check(WS in [w["name"] for w in stations["workstations"]], f"list_workstations names {WS}: {stations}")

        # A command task, waited for through its resource's subscription.
        created = await call(c, "create_task", {
            "intent": "say hello over MCP", "mode": "command",
            "command": "sleep 1; echo hello-from-mcp; echo hello-from-mcp", "targets": [WS],
        })
        task_id = created["task_id"]
        check(created["status"] in ("queued", "planned"), f"created {created}")
        updates = []
        done = await subscribe_until_done(c, task_id, updates, updated)
        check(done["status"] == "completed", f"task ended {done['status']}: {done.get('failure_reason')}")
        check(len(updates) >= 1, "at least one update notification arrived before completion")
        log(f"task {task_id} completed after {len(updates)} update notification(s)")

        task = await call(c, "get_task", {"task_id": task_id})
        check(task["steps"] and task["steps"][0]["exit_code"] == 0, f"step {task['steps']}")
        raw = await call(c, "get_task_logs", {"task_id": task_id})
        texts = [l["text"] for l in raw["lines"]]
        check(texts.count("hello-from-mcp") == 2, f"raw log {texts}")
        dedup = await call(c, "get_task_logs", {"task_id": task_id, "view": "dedup"})
        sig = [s for s in dedup["signatures"] if s["exemplar"] == "hello-from-mcp"]
        check(len(sig) == 1 and sig[0]["count"] == 2, f"dedup view {dedup['signatures']}")

        note = await call(c, "add_task_artifact", {
            "task_id": task_id, "kind": "note", "title": "checked by an agent", "body": "all **good**"})
        arts = await call(c, "list_artifacts", {"task_id": task_id})
        check(any(a["artifact_id"] == note["artifact_id"] for a in arts["artifacts"]), "the note is listed")

        listed = await call(c, "list_tasks", {"status": "completed", "mode": "command", "limit": 10})
        check(any(t["task_id"] == task_id for t in listed["tasks"]), "list_tasks filters find it")
        none = await call(c, "list_tasks", {"approval_status": "pending", "mode": "prompt"})
        check(all(t["task_id"] != task_id for t in none["tasks"]), "filters exclude it")

        # A failing task, then its retry.
        failing = await call(c, "create_task", {
            "intent": "fail on purpose", "mode": "command", "command": "exit 3", "targets": [WS]})
        failed = await wait_status(c, failing["task_id"], {"completed", "failed", "cancelled"})
        check(failed["status"] == "failed", f"failing task {failed['status']}")
        retry = await call(c, "retry_task", {"task_id": failing["task_id"]})
        check(retry["retry_of_task_id"] == failing["task_id"] and retry["attempt"] == 2, f"retry {retry}")
        again = await call(c, "retry_task", {"task_id": failing["task_id"]})
        check(again["task_id"] == retry["task_id"] and again["created"] is False, "a repeated retry returns it")

        # Cancel a running task.
        slow = await call(c, "create_task", {
            "intent": "wait", "mode": "command", "command": "sleep 30", "targets": [WS]})
        await wait_status(c, slow["task_id"], {"executing"})
        cancelled = await call(c, "cancel_task", {"task_id": slow["task_id"], "reason": "not needed"})
        check(cancelled["status"] == "cancelled", f"cancel {cancelled}")

        # Approvals with a person's tokens.
        approved = await call(c, "approve_task", {
            "task_id": os.environ["MCP_APPROVE_TASK"], "approval_token": os.environ["MCP_APPROVE_TOKEN"],
            "reason": "looked at it"})
        check(approved["approval_status"] == "approved", f"approve {approved}")
        rejected = await call(c, "reject_task", {
            "task_id": os.environ["MCP_REJECT_TASK"], "approval_token": os.environ["MCP_REJECT_TOKEN"],
            "reason": "too risky"})
        check(rejected["approval_status"] == "rejected" and rejected["status"] == "failed", f"reject {rejected}")
        await call_error(c, "approve_task", {
            "task_id": os.environ["MCP_APPROVE_TASK"], "approval_token": os.environ["MCP_APPROVE_TOKEN"]}, "conflict"
            if False else "token_used")

        # Business failures are tool results, never protocol errors.
        await call_error(c, "get_task", {"task_id": str(uuid.uuid4())}, "not_found")
        await call_error(c, "create_task", {"intent": " ", "mode": "command", "command": "true", "targets": [WS]},
                         "invalid_request")
        msg = await call_error(c, "create_task", {"intent": "x", "mode": "command", "command": 5, "targets": [WS]},
                               "malformed_payload")
        check("expected a string" in msg, f"the error says what was expected: {msg}")
        msg = await call_error(c, "create_task", {"intent": "x", "mode": "command", "command": "true",
                                                  "targets": "ws"}, "malformed_payload")
        check("targets" in msg, f"the error names the field: {msg}")
        await call_error(c, "cancel_task", {"task_id": task_id}, "conflict")

        overview = await read_json(c, "tanjiren://tasks/runtime-overview")
        for key in ("tasks_by_status", "tasks_by_approval_status", "steps_executing", "live_leases",
                    "queue_depth", "stale_lease_rejections", "durations", "schedules_due_next_hour"):
            check(key in overview, f"overview has {key}")
        check(overview["tasks_by_status"]["completed"] >= 1, f"overview counts {overview['tasks_by_status']}")
        check(overview["durations"]["count"] >= 1, "overview has durations")
        tool_overview = await call(c, "get_runtime_overview", {})
        check(tool_overview["tasks_by_status"]["failed"] >= 1, "the overview tool agrees")

        inv = await call(c, "create_investigation", {"title": "why is the disk full"})
        await call(c, "add_task_artifact", {"investigation_id": inv["investigation_id"], "kind": "evidence",
                                            "title": "df", "body": "95% used"})
        got = await call(c, "get_investigation", {"investigation_id": inv["investigation_id"]})
        check(got["title"] == "why is the disk full", f"investigation {got}")

        await refused(c.read_resource(f"tanjiren://tasks/{uuid.uuid4()}"), "reading an unknown task")
        with open(os.environ["MCP_STATE_FILE"], "w") as f:
            json.dump({"task_id": task_id}, f)
    log("operate flow passed")


async def read_only_flow() -> None:
    with open(os.environ["MCP_STATE_FILE"]) as f:
        task_id = json.load(f)["task_id"]
    async with client(os.environ["MCP_READ_TOKEN"]) as c:
        t = await call(c, "get_task", {"task_id": task_id})
        check(t["task_id"] == task_id, "a read token reads")
        await read_json(c, f"tanjiren://tasks/{task_id}")
        if TRANSPORT == "http":
            # Over HTTP the gateway answers 403 insufficient_scope before the call runs.
            await refused(c.call_tool("create_task", {
                "intent": "x", "mode": "command", "command": "true", "targets": [WS]}), "a read token creating a task")
        else:
            msg = await call_error(c, "create_task", {
                "intent": "x", "mode": "command", "command": "true", "targets": [WS]}, "forbidden")
            check("insufficient_scope" in msg and "mcp:operate" in msg, msg)
    log("read-only flow passed")


async def other_org_flow() -> None:
    with open(os.environ["MCP_STATE_FILE"]) as f:
        task_id = json.load(f)["task_id"]
    async with client(os.environ["MCP_OTHER_TOKEN"]) as c:
        await call_error(c, "get_task", {"task_id": task_id}, "not_found")
        await call_error(c, "cancel_task", {"task_id": task_id}, "not_found")
        await call_error(c, "add_task_artifact", {"task_id": task_id, "kind": "note", "title": "x", "body": "y"},
                         "not_found")
        listed = await call(c, "list_tasks", {})
        check(all(t["task_id"] != task_id for t in listed["tasks"]), "another organisation lists none of ours")
        await refused(c.read_resource(f"tanjiren://tasks/{task_id}"), "another organisation reading our task")
    log("organisation isolation passed")


async def http_auth() -> None:
    if TRANSPORT != "http":
        return
    url = os.environ["MCP_URL"]
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    async with httpx2.AsyncClient() as h:
        for auth in (None, "Bearer not-a-token"):
            hs = dict(headers, **({"Authorization": auth} if auth else {}))
            r = await h.post(url, json=init, headers=hs)
            check(r.status_code == 401, f"{auth}: {r.status_code}")
            challenge = r.headers.get("www-authenticate", "")
            check(challenge.startswith("Bearer ") and "resource_metadata=" in challenge, challenge)
            metadata_url = challenge.split('resource_metadata="')[1].split('"')[0]
            m = (await h.get(metadata_url)).json()
            check(m["resource"].endswith("/mcp") and "mcp:operate" in m["scopes_supported"], f"metadata {m}")
        r = await h.post(url, json=init, headers=dict(headers, Authorization=f"Bearer {os.environ['MCP_READ_TOKEN']}",
                                                         Origin="https://evil.example"))
        check(r.status_code == 403, f"a foreign Origin: {r.status_code}")
        r = await h.post(url, json={"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                    "params": {"name": "cancel_task", "arguments": {"task_id": str(uuid.uuid4())}}},
                         headers=dict(headers, Authorization=f"Bearer {os.environ['MCP_READ_TOKEN']}"))
        check(r.status_code == 403, f"a read token calling an operate tool: {r.status_code}")
        check('error="insufficient_scope"' in r.headers.get("www-authenticate", ""), r.headers.get("www-authenticate"))
    log("HTTP auth passed")


async def main() -> None:
    await http_auth()
    await operate_flow()
    await read_only_flow()
    await other_org_flow()
    log("ALL PASSED")


if __name__ == "__main__":
    try:
        anyio.run(main)
    except BaseException as e:  # noqa: BLE001 - report and fail
        print(f"[{TRANSPORT}/{MODE}] FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
