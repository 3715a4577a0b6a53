"""The closed loop's batch steps: chat datasets, LoRA training, the evaluation gate.

Imported by the command line and the monitor only; it imports ``loragate.common`` and nothing
above it. Heavy libraries (torch, peft, transformers) are imported inside the functions that
train, so importing this package stays cheap.
"""
