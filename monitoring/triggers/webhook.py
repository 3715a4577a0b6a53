"""The webhook action: the trigger as signed JSON, POSTed with retries."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from loragate.common import webhooks
from loragate.common.jsonable import finite
from loragate.monitoring.triggers.action import ActionResult, TriggerContext


def payload(ctx: TriggerContext) -> dict[str, Any]:
    summary = ctx.result.to_dict()
    summary.pop("prometheus", None)
    return {
        "event": "loragate.retraining_trigger",
        "route": ctx.route,
        "variant": ctx.variant,
        "reason": ctx.decision.reason,
        "summary": {
            k: summary[k]
            for k in (
                "status",
                "drifted_groups",
                "share",
                "drifted_features",
                "drift_share_threshold",
                "reference_rows",
                "current_rows",
            )
        },
        "report_location": ctx.result.html_path,
        "summary_location": ctx.result.json_path,
        "dataset_location": ctx.dataset_location,
        "run_id": ctx.run_id,
    }


class WebhookAction:
    """POST the trigger as JSON, signed as Standard Webhooks do (loragate.common.webhooks: one
    webhook-id per event, each attempt signed with its own timestamp); retried with backoff on
    connection errors, 429 and 5xx (4xx other than 429 is final)."""

    name = "webhook"

    def __init__(
        self, url: str, secret: str, *, attempts: int = 4, backoff_s: float = 0.5, timeout_s: float = 10.0
    ) -> None:
        webhooks.secret_key(secret)  # a malformed whsec_ secret fails here, at configuration time
        self.url, self.secret = url, secret
        self.attempts, self.backoff_s, self.timeout_s = attempts, backoff_s, timeout_s

    async def run(self, ctx: TriggerContext) -> ActionResult:
        import aiohttp

        body = json.dumps(finite(payload(ctx)), separators=(",", ":")).encode()
        message_id = webhooks.new_message_id()  # the receiver's idempotency key: the same for every retry
        detail = ""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as session:
            for attempt in range(self.attempts):
                headers = {
                    "content-type": "application/json",
                    **webhooks.sign(self.secret, body, message_id=message_id),
                }
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
                    await asyncio.sleep(self.backoff_s * 2**attempt)
        return ActionResult(self.name, False, f"gave up after {self.attempts} attempts: {detail}")
