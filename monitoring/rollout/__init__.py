"""Progressive delivery of adapter versions: canary analysis and the promote / roll-back state machine.

The vocabulary is Flagger's and Argo Rollouts'. A rollout moves one route's traffic from its
``stable`` variant to a ``canary`` variant in steps of canary weight (e.g. 5, 25, 50 %). Every
``interval_s`` the canary is analysed against the stable variant from the gateway's own metrics
in Prometheus, over the traffic since the step began (at most ``max_window_s``):

* inconclusive: fewer than ``min_requests`` requests were routed to the canary -> hold the step;
* fail: a check is past its threshold (``failure_limit`` analyses in a row) -> roll back
  (canary 0, stable 100), state ``rolled_back``;
* pass -> the next step; a pass at the last step below 100 -> promote (canary 100, stable 0),
  state ``promoted``.

Checks (names of ``loragate_rollout_analysis{check}``):

  canary_requests      requests routed to the canary: answered by it + moved off it
  error_rate_increase  5xx share of the canary's routed requests minus the stable's
  latency_p95_ratio    p95 request duration, canary / stable (both raised to ``latency_floor_s``
                       first: ratios of a few milliseconds are noise)
  fallback_rate        share of the canary's routed requests moved to the fallback chain. A
                       failing adapter is hidden from clients by the fallback (they get a 200
                       from the base model): this is the check that catches it
  feedback_score       mean feedback score of the canary (only with ``min_feedback_score``, and
                       judged once ``min_feedback`` scores exist)

The weights go to the routes source the gateways watch: the routes YAML file (rewritten
atomically, validated with ``loragate.common.catalog.parse_catalog`` first) or, in a cluster, the routes
ConfigMap (patched with the official client, conditional on the resourceVersion read). The
state lives in a JSON file, re-read every round, so a restarted monitor resumes where it was and
``loragate rollout promote|rollback`` (another process) is seen by the running monitor.

Modules: ``config`` (the YAML section), ``state`` (the JSON state file), ``analysis`` (PromQL and
Prometheus -> Measurements), ``judge`` (Measurements -> pass / fail / inconclusive), ``metrics`` (the
monitor's own series), ``routes`` (the routes file or ConfigMap the weights go to), ``errors``, and
``controller`` (the state machine that ties them together).
"""
