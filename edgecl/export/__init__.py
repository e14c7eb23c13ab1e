"""ONNX snapshots for devices, on the daemon's side: export (onnx, memory), the parity gate
(gate, heldout), the versioned store (snapshots), freshness, and the daemon feature that ties
them together (service). The device's side is edgecl.client.device."""
