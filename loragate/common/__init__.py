"""The shared floor: imported by the gateway and the monitor, imports neither."""
