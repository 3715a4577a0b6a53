"""Retraining triggers: a policy per route decides, actions carry it out.

Policy: the drift share is above a threshold for K runs in a row and/or the mean feedback
score is below a threshold -> fire, then stay quiet for a cool-down. The counters and the
time of the last firing live in a small JSON file, so a restarted monitor keeps them.

Actions: a signed webhook POST, a fine-tuning dataset export (chat-format JSONL), and a
Kubernetes Job from a YAML template.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import re
import string
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, Field

from loragate.common.jsonable import finite

if TYPE_CHECKING:
    import pandas as pd

    from loragate.monitoring.drift import DriftResult

log = logging.getLogger("loragate.monitor")
SIGNATURE_HEADER = "x-loragate-signature"


# --- policy and state --------------------------------------------------------------------------

class TriggerPolicy(BaseModel):
    drift_share_above: float | None = Field(0.3, description="a run counts when its drift share is above this")
    consecutive_runs: int = Field(2, ge=1, description="K: counting runs in a row needed to fire")
    feedback_score_below: float | None = Field(None, description="fire when the mean feedback score is below")
    min_feedback: int = Field(20, ge=1, description="fewer scored requests: the feedback condition is not judged")
    combine: Literal["any", "all"] = "any"  # drift or feedback / drift and feedback
    cooldown_s: float = Field(86_400, ge=0)


class KeyState(BaseModel):
    consecutive: int = 0
    last_fired: float | None = None
    fired: int = 0
    last_run: float | None = None


class TriggerState:
    """Counters per ``route/variant``, persisted atomically to a JSON file after every change."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self.keys: dict[str, KeyState] = {}
        if self.path and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.keys = {k: KeyState(**v) for k, v in data.get("keys", {}).items()}
            except (ValueError, TypeError) as exc:
                log.warning("trigger state %s unreadable (%s); starting fresh", self.path, exc)

    def get(self, key: str) -> KeyState:
        return self.keys.setdefault(key, KeyState())

    def save(self) -> None:
        if not self.path:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"keys": {k: v.model_dump() for k, v in self.keys.items()}}, indent=2)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".trigger-state-")
        with os.fdopen(fd, "w") as f:
            f.write(payload)
        os.replace(tmp, self.path)


@dataclass
class Decision:
    fire: bool
    reason: str
    drift_condition: bool = False
    feedback_condition: bool = False
    consecutive: int = 0
    cooldown_left_s: float = 0.0


def decide(policy: TriggerPolicy, state: KeyState, result: "DriftResult",
           feedback_scores: "pd.Series | None" = None, *, now: float | None = None) -> Decision:
    """Update ``state`` with one drift run and say whether to fire. Pure apart from ``state``.

    An insufficient-data run neither counts nor breaks the streak.
    """
    now = time.time() if now is None else now
    state.last_run = now
    if result.status != "insufficient_data" and policy.drift_share_above is not None:
        state.consecutive = state.consecutive + 1 if result.share > policy.drift_share_above else 0
    drift_ok = policy.drift_share_above is not None and state.consecutive >= policy.consecutive_runs

    feedback_ok, feedback_note = False, ""
    if policy.feedback_score_below is not None and feedback_scores is not None:
        scores = feedback_scores.dropna()
        if len(scores) >= policy.min_feedback:
            mean = float(scores.mean())
            feedback_ok = mean < policy.feedback_score_below
            feedback_note = f"feedback mean {mean:.3f} over {len(scores)}"

    conditions = [c for c, on in ((drift_ok, policy.drift_share_above is not None),
                                  (feedback_ok, policy.feedback_score_below is not None)) if on]
    wanted = bool(conditions) and (all(conditions) if policy.combine == "all" else any(conditions))
    reason = (f"drift share {result.share:.2f} ({state.consecutive}/{policy.consecutive_runs} runs above "
              f"{policy.drift_share_above})" + (f"; {feedback_note}" if feedback_note else ""))
    decision = Decision(False, reason, drift_ok, feedback_ok, state.consecutive)
    if not wanted:
        return decision
    if state.last_fired is not None and now - state.last_fired < policy.cooldown_s:
        decision.cooldown_left_s = policy.cooldown_s - (now - state.last_fired)
        decision.reason += f"; cooling down ({decision.cooldown_left_s:.0f} s left)"
        return decision
    state.last_fired, state.fired, state.consecutive = now, state.fired + 1, 0
    decision.fire = True
    return decision


# --- actions -----------------------------------------------------------------------------------

@dataclass
class TriggerContext:
    route: str
    variant: str | None
    result: "DriftResult"
    decision: Decision
    requests: "pd.DataFrame | None" = None  # the current window, for the dataset export
    feedback: "pd.DataFrame | None" = None
    dataset_location: str | None = None  # set by the dataset action, read by the later ones
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S", time.gmtime()))


@dataclass
class ActionResult:
    action: str
    ok: bool
    detail: str = ""


class Action(Protocol):
    name: str

    async def run(self, ctx: TriggerContext) -> ActionResult: ...


def sign(body: bytes, secret: str | bytes) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, secret: str | bytes, header: str | None) -> bool:
    return bool(header) and hmac.compare_digest(sign(body, secret), header)


def payload(ctx: TriggerContext) -> dict[str, Any]:
    summary = ctx.result.to_dict()
    summary.pop("prometheus", None)
    return {
        "event": "loragate.retraining_trigger",
        "route": ctx.route,
        "variant": ctx.variant,
        "reason": ctx.decision.reason,
        "summary": {k: summary[k] for k in ("status", "share", "drifted_features", "drift_share_threshold",
                                             "reference_rows", "current_rows")},
        "report_location": ctx.result.html_path,
        "summary_location": ctx.result.json_path,
        "dataset_location": ctx.dataset_location,
        "run_id": ctx.run_id,
    }


class WebhookAction:
    """POST the trigger as JSON, signed with HMAC-SHA256 over the raw body; retried with backoff
    on connection errors, 429 and 5xx (4xx other than 429 is final)."""

    name = "webhook"

    def __init__(self, url: str, secret: str, *, attempts: int = 4, backoff_s: float = 0.5,
                 timeout_s: float = 10.0) -> None:
        self.url, self.secret = url, secret
        self.attempts, self.backoff_s, self.timeout_s = attempts, backoff_s, timeout_s

    async def run(self, ctx: TriggerContext) -> ActionResult:
        import aiohttp

        body = json.dumps(finite(payload(ctx)), separators=(",", ":")).encode()
        headers = {"content-type": "application/json", SIGNATURE_HEADER: sign(body, self.secret)}
        detail = ""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as session:
            for attempt in range(self.attempts):
                try:
                    async with session.post(self.url, data=body, headers=headers) as resp:
                        if resp.status < 300:
                            return ActionResult(self.name, True, f"{resp.status} after {attempt + 1} attempt(s)")
                        detail = f"HTTP {resp.status}"
                        if resp.status < 500 and resp.status != 429:
                            return ActionResult(self.name, False, detail)
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    detail = f"{type(exc).__name__}: {exc}"
                if attempt + 1 < self.attempts:
                    await asyncio.sleep(self.backoff_s * 2 ** attempt)
        return ActionResult(self.name, False, f"gave up after {self.attempts} attempts: {detail}")


def to_chat_records(requests: "pd.DataFrame", feedback: "pd.DataFrame | None" = None, *,
                    min_score: float | None = None, scrub_text=None) -> list[dict]:
    """Request-log rows (already scrubbed by the writer) -> ``{"messages": [...]}`` records.

    Feedback is joined on request_id (the latest per request); a correction replaces the
    logged answer and is scrubbed here, since it never went through the writer. Rows with
    a score below ``min_score`` and no correction are left out, as are failed requests and
    rows without text.
    """
    import pandas as pd

    if scrub_text is None:
        from loragate.common.scrub import scrub as scrub_text
    frame = requests
    if "status" in frame:
        frame = frame[pd.to_numeric(frame["status"], errors="coerce") == 200]
    if feedback is not None and len(feedback):
        latest = feedback.sort_values("timestamp").drop_duplicates("request_id", keep="last")
        frame = frame.merge(latest[["request_id", "score", "correction"]], on="request_id", how="left")
    records = []
    for row in frame.itertuples(index=False):
        prompt = getattr(row, "prompt_text", None)
        correction = getattr(row, "correction", None)
        correction = correction if isinstance(correction, str) and correction.strip() else None
        score = getattr(row, "score", None)
        if correction is None and min_score is not None and _number(score) is not None and score < min_score:
            continue
        answer = scrub_text(correction) if correction else getattr(row, "response_text", None)
        if not isinstance(prompt, str) or not prompt.strip() or not isinstance(answer, str) or not answer.strip():
            continue
        records.append({"messages": _prompt_messages(prompt) + [{"role": "assistant", "content": answer}]})
    return records


_ROLE_LINE = re.compile(r"^(system|user|assistant|tool|developer): ?(.*)$")


def _prompt_messages(prompt: str) -> list[dict]:
    """The logged prompt back into chat turns.

    The writer logs chat prompts as one ``role: content`` line per message (a line without
    a role prefix continues the previous message); anything else is one user turn.
    """
    messages: list[dict] = []
    for line in prompt.split("\n"):
        match = _ROLE_LINE.match(line)
        if match:
            messages.append({"role": match[1], "content": match[2]})
        elif messages:
            messages[-1]["content"] += "\n" + line
        else:
            return [{"role": "user", "content": prompt}]
    messages = [m for m in messages if m["role"] in ("system", "user", "assistant")]
    return messages or [{"role": "user", "content": prompt}]


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def write_jsonl(records: list[dict], location: str) -> str:
    """Write to a local path or an ``s3://``-style URL (pyarrow filesystems)."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    if "://" in location and not location.startswith("file://"):
        from pyarrow import fs

        filesystem, path = fs.FileSystem.from_uri(location)
        with filesystem.open_output_stream(path) as out:
            out.write(data)
    else:
        path = Path(location.removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return location


class DatasetExportAction:
    """Recent scrubbed traffic with feedback joined, as chat JSONL ready for fine-tuning."""

    name = "dataset"

    def __init__(self, location: str, *, min_score: float | None = None, max_rows: int = 50_000) -> None:
        self.location, self.min_score, self.max_rows = location.rstrip("/"), min_score, max_rows

    async def run(self, ctx: TriggerContext) -> ActionResult:
        if ctx.requests is None or not len(ctx.requests):
            return ActionResult(self.name, False, "no requests in the window")
        requests = ctx.requests.tail(self.max_rows)
        records = await asyncio.to_thread(to_chat_records, requests, ctx.feedback, min_score=self.min_score)
        name = f"{ctx.route}-{ctx.variant or 'all'}-{ctx.run_id}.jsonl"
        location = await asyncio.to_thread(write_jsonl, records, f"{self.location}/{name}")
        ctx.dataset_location = location
        return ActionResult(self.name, True, f"{len(records)} records -> {location}")


class KubernetesJobAction:
    """Create a batch/v1 Job from a YAML template with the official client.

    The template is filled with ``string.Template`` (``${route}``, ``${variant}``, ``${run_id}``,
    ``${dataset}``, ``${report}``, ``${summary}``). ``api`` is a BatchV1Api or anything with
    ``create_namespaced_job(namespace, body)``; by default one is built from the in-cluster
    config (the monitor's service account).
    """

    name = "k8s_job"

    def __init__(self, template: str | Path, namespace: str = "default", api: Any = None) -> None:
        self.template = Path(template).read_text() if Path(str(template)).exists() else str(template)
        self.namespace, self._api = namespace, api

    def manifest(self, ctx: TriggerContext) -> dict:
        import yaml

        values = {"route": ctx.route, "variant": ctx.variant or "", "run_id": ctx.run_id,
                  "dataset": ctx.dataset_location or "", "report": ctx.result.html_path or "",
                  "summary": ctx.result.json_path or ""}
        body = yaml.safe_load(string.Template(self.template).safe_substitute(values))
        meta = body.setdefault("metadata", {})
        if "name" not in meta and "generateName" not in meta:
            meta["generateName"] = f"loragate-retrain-{_dns(ctx.route)}-"
        meta.setdefault("labels", {}).update({"app.kubernetes.io/managed-by": "loragate-monitor",
                                              "loragate.io/route": _dns(ctx.route)})
        return body

    def api(self):
        if self._api is None:
            from kubernetes import client, config

            config.load_incluster_config()
            self._api = client.BatchV1Api()
        return self._api

    async def run(self, ctx: TriggerContext) -> ActionResult:
        body = self.manifest(ctx)
        created = await asyncio.to_thread(self.api().create_namespaced_job, self.namespace, body)
        meta = getattr(created, "metadata", None)
        name = getattr(meta, "name", None) or (created.get("metadata", {}).get("name") if isinstance(created, dict) else None)
        return ActionResult(self.name, True, f"job {self.namespace}/{name}")


def _dns(value: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-")[:40] or "route"


# --- the engine --------------------------------------------------------------------------------

class ActionConfig(BaseModel):
    type: Literal["webhook", "dataset", "k8s_job"]
    url: str | None = None
    secret: str | None = None
    secret_env: str | None = None  # read the webhook secret from this environment variable
    attempts: int = 4
    backoff_s: float = 0.5
    location: str | None = None  # dataset: a directory or s3:// prefix
    min_score: float | None = None
    template: str | None = None  # k8s_job: a file path or the YAML itself
    namespace: str = "default"

    def build(self, k8s_api: Any = None) -> Action:
        if self.type == "webhook":
            secret = self.secret or (os.environ.get(self.secret_env, "") if self.secret_env else "")
            if not self.url or not secret:
                raise ValueError("a webhook action needs url and secret (or secret_env)")
            return WebhookAction(self.url, secret, attempts=self.attempts, backoff_s=self.backoff_s)
        if self.type == "dataset":
            if not self.location:
                raise ValueError("a dataset action needs location")
            return DatasetExportAction(self.location, min_score=self.min_score)
        if not self.template:
            raise ValueError("a k8s_job action needs template")
        return KubernetesJobAction(self.template, self.namespace, api=k8s_api)


@dataclass
class TriggerOutcome:
    decision: Decision
    actions: list[ActionResult] = field(default_factory=list)


class Trigger:
    """One policy and its actions for one route/variant, with the shared persisted state.

    Actions run in order (the dataset export first, so the webhook and the Job can name it);
    one failing does not stop the others.
    """

    def __init__(self, route: str, variant: str | None, policy: TriggerPolicy, actions: list[Action],
                 state: TriggerState) -> None:
        self.route, self.variant, self.policy, self.state = route, variant, policy, state
        order = {"dataset": 0}
        self.actions = sorted(actions, key=lambda a: order.get(a.name, 1))

    @property
    def key(self) -> str:
        return f"{self.route}/{self.variant or '*'}"

    async def handle(self, result: "DriftResult", *, requests: "pd.DataFrame | None" = None,
                     feedback: "pd.DataFrame | None" = None, now: float | None = None) -> TriggerOutcome:
        scores = feedback["score"] if feedback is not None and "score" in feedback else None
        decision = decide(self.policy, self.state.get(self.key), result, scores, now=now)
        self.state.save()
        outcome = TriggerOutcome(decision)
        if not decision.fire:
            return outcome
        log.warning("retraining trigger for %s: %s", self.key, decision.reason)
        ctx = TriggerContext(self.route, self.variant, result, decision, requests, feedback)
        for action in self.actions:
            try:
                outcome.actions.append(await action.run(ctx))
            except Exception as exc:  # an action's failure is reported, never fatal to the monitor
                outcome.actions.append(ActionResult(action.name, False, f"{type(exc).__name__}: {exc}"))
        for item in outcome.actions:
            (log.info if item.ok else log.error)("trigger action %s for %s: %s", item.action, self.key, item.detail)
        return outcome
