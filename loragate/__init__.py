"""loragate: serve fine-tuned LoRA adapters on vLLM, roll them out, watch them drift, retrain them.

Layers (checked by import-linter, see pyproject.toml): ``loragate.common`` is the shared floor
(routes-catalog schema, request-log schema, scrubbing, small I/O helpers); the gateway
(``loragate.service``, folder ``service/``) and the monitor (``loragate.monitoring``, folder
``monitoring/``) stand beside each other on it and never import each other; ``loragate.cli``
is above both.
"""

__version__ = "0.2.0"
