"""Progressive delivery of adapter versions: canary analysis and the promote / roll-back state machine.

The vocabulary is Flagger's and Argo Rollouts'. A rollout moves one route's traffic from its
``stable`` variant to a ``canary`` variant in steps of canary weight (e.g. 5, 25, 50 %). Every
``interval_s`` the canary is analysed against the stable variant from the gateway's own metrics
in Prometheus, over the traffic since the step began (at most ``max_window_s``):

* the judge (monitoring/judge.py) compares the canary with the stable variant check by check
  (error_rate, fallback_rate, latency, optional feedback) with always-valid confidence sequences,
  each with a min effect that matters and a min sample;
* inconclusive (not enough data yet) -> hold the step; ``max_holds`` holds in a row -> stalled:
  the step is held for good and never promoted (an alert fires; a person promotes or rolls back);
* fail (``failure_limit`` analyses in a row) -> roll back (canary 0, stable 100), ``rolled_back``;
* pass -> the next step; a pass at the last step below 100 -> promote (canary 100, stable 0),
  state ``promoted``.

A failing adapter is hidden from clients by the fallback (they get a 200 from the base model):
the fallback_rate check is the one that catches it.

The weights go to the routes source the gateways watch: the routes YAML file (rewritten
atomically, validated with ``loragate.common.catalog.parse_catalog`` first) or, in a cluster, the routes
ConfigMap (patched with the official client, conditional on the resourceVersion read). The
state lives in a JSON file, re-read every round, so a restarted monitor resumes where it was and
``loragate rollout promote|rollback`` (another process) is seen by the running monitor.

Modules: ``config`` (the YAML section), ``state`` (the JSON state file), ``analysis`` (PromQL and
Prometheus -> the judge's Observed counts), ``judge`` (Observed -> a Verdict), ``metrics`` (the
monitor's own series), ``routes`` (the routes file or ConfigMap the weights go to), ``errors``, and
``controller`` (the state machine that ties them together).
"""
