"""Delivery: what goes to the sites and which of a model's heads they serve.

- `messages`: the signed manifest and the retained chunks of one model version over MQTT.
- `gate`: before a model is served, the sites evaluate each of its heads (the candidate and the baselines
  the same uploads allow) on their held-out samples; the gate serves the best and refuses one at chance
  (docs/delivery-gate.md).
"""

from hub.delivery.gate import Decision, choose
from hub.delivery.messages import DEFAULT_CHUNK_BYTES, clear_messages, model_messages, onnx_parameters

__all__ = ["DEFAULT_CHUNK_BYTES", "Decision", "choose", "clear_messages", "model_messages", "onnx_parameters"]
