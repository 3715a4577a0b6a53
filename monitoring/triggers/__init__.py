"""Retraining triggers: a policy per route decides, actions carry it out.

Policy: the drift share is above a threshold for K runs in a row and/or the mean feedback
score is below a threshold -> fire, then stay quiet for a cool-down. The counters and the
time of the last firing live in a small JSON file, so a restarted monitor keeps them.

Actions: a signed webhook POST, a fine-tuning dataset export (chat-format JSONL), and a
Kubernetes Job from a YAML template.

Modules: ``policy`` (TriggerPolicy, decide), ``state`` (the persisted counters), ``action`` (what an
action gets and returns), one per action: ``webhook``, ``dataset`` (export), ``kube_job``; ``config``
(the YAML action entries, built into actions) and ``engine`` (Trigger: one policy and its actions).
"""
