"""How the hub learns the global model from contributions in a way that can forget them exactly."""
