"""fedge edge: encodes local data with onnxruntime and publishes prototypes. Never imports torch."""
