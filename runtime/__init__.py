"""Service plumbing shared by the edge and hub services: the MQTT boundary, SQLite, /metrics, settings.

`contract` is what goes over the wire; this is how a service runs. Torch-free, like the edge.
"""
